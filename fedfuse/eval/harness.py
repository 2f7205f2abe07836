"""One ``fedfuse eval`` run: a local Hugging Face model through lm-evaluation-harness, offline.

The model folder (a ``fedfuse merge`` / ``fedfuse export`` output, any HF causal-LM folder, or the alias
``smollm2`` for the embedded SmolLM2 converted into the cache) is loaded once as lm-eval's
:class:`~lm_eval.models.huggingface.HFLM`; each selected task then runs through
:func:`lm_eval.simple_evaluate` with that model, so a progress callback can follow the tasks. Prompts
go through the tokenizer's chat template when it has one (``apply_chat_template``), and the shipped
skill tasks decode greedily and score exact match locally (``fedfuse/eval/task_files/skill_utils.py``).

Nothing is downloaded: the run sets ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` and the matching
constants of already-imported ``huggingface_hub`` and ``datasets``, and puts them back afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedfuse.eval.tasks import EvalError, Selection

INSTALL_HINT = 'lm-evaluation-harness is not installed: pip install "fedfuse[eval]"'
"""The one line printed when the ``eval`` extra is missing."""

SMOLLM2_ALIAS = "smollm2"
"""``MODEL_DIR`` alias for the embedded SmolLM2-135M-Instruct (converted once into the cache)."""

Device = Literal["auto", "cpu", "cuda"]

_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
_OFFLINE_CONSTANTS = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
)


def require_lm_eval() -> str:
    """The installed lm-eval version; :class:`EvalError` with the install line when it is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError(INSTALL_HINT) from None
    return importlib.metadata.version("lm_eval")


@contextlib.contextmanager
def _tqdm_silenced() -> Iterator[None]:
    """Every tqdm bar disabled for the block (lm-eval, datasets and transformers each draw their own).

    ``TQDM_DISABLE`` is read when tqdm is imported, and lm-eval passes ``disable=`` itself, so the
    constructor is wrapped for the block and put back after it.
    """
    std = importlib.import_module("tqdm.std")  # tqdm ships no type hints
    original = std.tqdm.__init__

    def disabled(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = disabled
    try:
        yield
    finally:
        std.tqdm.__init__ = original


def _git_hash_quietly() -> str | None:
    """lm-eval's ``git describe --always`` of the working directory, without git's "fatal:" line outside a repo."""
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip() or None


@contextlib.contextmanager
def _quiet_git_hash() -> Iterator[None]:
    """:func:`lm_eval.simple_evaluate` records the git hash with :func:`_git_hash_quietly` in the block."""
    import lm_eval.evaluator

    original = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = _git_hash_quietly
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hub and datasets offline, lm-eval's log quiet and tqdm bars off for the block, whatever was imported."""
    saved_env = {key: os.environ.get(key) for key in _OFFLINE_ENV}
    os.environ.update(_OFFLINE_ENV)
    saved: list[tuple[Any, str, Any]] = []
    for module_name, attribute in _OFFLINE_CONSTANTS:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attribute):
            saved.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, True)
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with _tqdm_silenced():
            yield
    finally:
        for module, attribute, value in saved:
            setattr(module, attribute, value)
        for key, old in saved_env.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def resolve_model(model: str, *, on_prepare: Callable[[], None] | None = None) -> Path:
    """The Hugging Face folder to evaluate: ``model`` itself, or the prepared SmolLM2 folder for ``smollm2``.

    Raises
    ------
    EvalError
        When the folder does not exist or holds no ``config.json`` (not a Hugging Face model folder).
    """
    if model == SMOLLM2_ALIAS and not Path(model).exists():
        from fedfuse.models.loading import ModelLoadError
        from fedfuse.models.smollm2 import is_current, prepare_smollm2

        if on_prepare is not None and not is_current():
            on_prepare()
        try:
            return prepare_smollm2()
        except ModelLoadError as exc:
            raise EvalError(str(exc).splitlines()[0]) from None
    folder = Path(model)
    if not folder.is_dir():
        raise EvalError(f"no model folder {folder} (a Hugging Face folder, e.g. a fedfuse merge output, or smollm2)")
    if not (folder / "config.json").is_file():
        raise EvalError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    return folder.resolve()


def pick_device(device: str) -> str:
    """``cpu`` or ``cuda`` for ``auto`` / ``cpu`` / ``cuda``; :class:`EvalError` for CUDA without a GPU."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise EvalError(f"--device {device}: choose auto, cpu or cuda")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: no CUDA device is available (use --device cpu)")
    return device


def load_model(folder: Path, *, device: str, batch_size: int) -> Any:
    """lm-eval's ``HFLM(pretrained=folder)`` on ``device``; :class:`EvalError` when it cannot be used."""
    from lm_eval.models.huggingface import HFLM

    try:
        lm = HFLM(pretrained=str(folder), device=device, batch_size=batch_size, dtype="auto")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EvalError(f"cannot load {folder} as a causal LM: {first}") from None
    if lm.tokenizer.eos_token_id is None:
        raise EvalError(f"the tokenizer in {folder} has no eos token, which generation needs to stop")
    return lm


@dataclass
class EvalReport:
    """Everything one run found: metrics per task, lm-eval's raw results, and optionally each generation."""

    model: str
    device: str
    chat_template: bool
    limit: int | None
    lm_eval_version: str
    tasks: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The results file: ``tasks`` (metric → value per task) first, lm-eval's own sections after."""
        out: dict[str, Any] = {
            "model": self.model,
            "device": self.device,
            "chat_template": self.chat_template,
            "limit": self.limit,
            "lm_eval_version": self.lm_eval_version,
            "tasks": self.tasks,
            **self.raw,
        }
        if self.samples:
            out["samples"] = self.samples
        return out


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def task_metrics(results: dict[str, Any]) -> dict[str, float | int | None]:
    """lm-eval's ``"exact_match,none"`` keys as ``exact_match`` (other filters keep ``metric,filter``)."""
    metrics: dict[str, float | int | None] = {}
    for key, value in results.items():
        if "," not in key:
            continue
        metric, filter_name = key.split(",", 1)
        metrics[metric if filter_name == "none" else key] = _number(value)
    if isinstance(results.get("sample_len"), int):
        metrics["samples"] = results["sample_len"]
    return metrics


def _sample_rows(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for sample in samples:
        arguments = sample.get("arguments") or [[""]]
        generation = sample.get("filtered_resps")
        rows.append(
            {
                "doc_id": sample.get("doc_id"),
                "prompt": str(arguments[0][0]),
                "target": str(sample.get("target")),
                "generation": generation[0] if isinstance(generation, list) and generation else generation,
                **{metric: _number(sample.get(metric)) for metric in sample.get("metrics", [])},
            }
        )
    return rows


_RAW_SECTIONS = ("results", "groups", "versions", "n-shot", "n-samples", "higher_is_better")


def evaluate(
    lm: Any,
    selection: Selection,
    *,
    model: str,
    device: str,
    limit: int | None = None,
    log_samples: bool = False,
    on_task: Callable[[str], None] | None = None,
) -> EvalReport:
    """Run every selected task on the loaded model ``lm`` (see :func:`load_model`), one after the other.

    Parameters
    ----------
    lm
        An lm-eval model (``HFLM``).
    selection
        The tasks (:func:`fedfuse.eval.tasks.select`).
    model, device
        Recorded in the report.
    limit
        At most this many examples per task (all when ``None``).
    log_samples
        Keep each prompt, target, generation and per-example metric in the report.
    on_task
        Called with each task's name after it finished.
    """
    from lm_eval import simple_evaluate

    chat = bool(getattr(lm.tokenizer, "chat_template", None))
    report = EvalReport(model, device, chat, limit, require_lm_eval())
    for spec, name in zip(selection.specs, selection.names, strict=True):
        with offline(), _quiet_git_hash():
            result = simple_evaluate(
                model=lm,
                tasks=[spec],
                limit=limit,
                task_manager=selection.manager,
                apply_chat_template=chat,
                log_samples=log_samples,
                bootstrap_iters=1000,
            )
        if result is None:  # only on non-zero ranks of a distributed run
            continue
        for section in _RAW_SECTIONS:
            report.raw.setdefault(section, {}).update(result.get(section) or {})
        for task, values in (result.get("results") or {}).items():
            report.tasks[task] = task_metrics(values)
        for task, samples in (result.get("samples") or {}).items():
            report.samples[task] = _sample_rows(samples)
        if on_task is not None:
            on_task(name)
    return report

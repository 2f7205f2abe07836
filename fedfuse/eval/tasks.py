"""Which lm-evaluation-harness tasks ``fedfuse eval`` runs: fedfuse's skill tasks, the user's, lm-eval's own.

fedfuse ships one task per skill of :mod:`fedfuse.data.skills` as package data (``fedfuse/eval/task_files/
fedfuse_<skill>.yaml``, all including ``_skill_template.yaml``). Each reads ``<skill>-test.jsonl`` from
the folder given as ``--data-dir`` (the files :func:`fedfuse.data.skills.write_skill_files` writes):
the data folder goes into the task's ``dataset_kwargs.data_dir``, against which the ``datasets`` json
builder resolves the relative ``data_files``. ``fedfuse_<name>`` also names a task for *any*
``<name>-test.jsonl`` chat file in the data folder that has no YAML of its own (built from the template).

Folders passed as ``include_paths`` are indexed by lm-eval's :class:`~lm_eval.tasks.TaskManager` after
fedfuse's (``TaskManager(include_path=[...])``: every ``*.yaml`` with a ``task:``/``group:`` key below
them), so a user's task names resolve like fedfuse's and may override them. lm-eval's own ~15k task
files are indexed only when a name is found nowhere else (indexing them takes ~10 s).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

TASKS_DIR = Path(__file__).resolve().parent / "task_files"
"""The task YAMLs shipped with fedfuse (package data)."""

TEMPLATE = TASKS_DIR / "_skill_template.yaml"
"""The part every skill task shares: prompt, target, greedy decoding, the exact-match metric."""

PREFIX = "fedfuse_"
"""Task names of skills: ``fedfuse_<skill>``."""

SKILLS_TAG = "fedfuse_skills"
"""The tag of every shipped skill task (``--tasks fedfuse_skills`` runs them all)."""

DEFAULT_MAX_GEN_TOKS = 32
"""Generation budget of a ``fedfuse_<name>`` task built from the template for a file without a YAML."""

TaskSpec = str | dict[str, Any]
"""What :func:`lm_eval.simple_evaluate` takes per task: a registered name or a full task config."""


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message is one line for the user."""


@dataclass(frozen=True)
class Selection:
    """The tasks to run, in order, and the task manager that resolves the names among them."""

    specs: tuple[TaskSpec, ...]
    manager: TaskManager

    @property
    def names(self) -> list[str]:
        """The task (or group) name of each spec."""
        return [spec if isinstance(spec, str) else str(spec["task"]) for spec in self.specs]


def shipped_tasks() -> list[str]:
    """The skill task names fedfuse ships, sorted (``fedfuse_arithmetic``, …)."""
    return sorted(path.stem for path in TASKS_DIR.glob(f"{PREFIX}*.yaml"))


def _check_folders(include_paths: Sequence[Path]) -> list[Path]:
    folders = []
    for folder in include_paths:
        if not folder.is_dir():
            raise EvalError(f"--include-path {folder}: no such folder of lm-eval task YAMLs")
        folders.append(folder.resolve())
    return folders


def task_manager(include_paths: Sequence[Path] = (), *, defaults: bool = False) -> TaskManager:
    """A :class:`~lm_eval.tasks.TaskManager` over fedfuse's tasks, then ``include_paths`` (later ones win)."""
    from lm_eval.tasks import TaskManager

    folders = [TASKS_DIR, *_check_folders(include_paths)]
    return TaskManager(include_defaults=defaults, include_path=[str(folder) for folder in folders])


def _is_shipped(manager: TaskManager, name: str) -> bool:
    entry = manager.task_index.get(name)
    return entry is not None and entry.yaml_path is not None and Path(entry.yaml_path).resolve().parent == TASKS_DIR


def _data_folder(data_dir: Path | None, task: str) -> Path:
    if data_dir is None:
        raise EvalError(f"task {task} reads <skill>-test.jsonl files: pass --data-dir DIR (fedfuse.data.skills)")
    if not data_dir.is_dir():
        raise EvalError(f"--data-dir {data_dir}: no such folder")
    return data_dir.resolve()


def _with_data_dir(config: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    """A loaded skill task config reading its files from ``data_dir``; each named file must exist."""
    config = deepcopy(config)
    kwargs = config.setdefault("dataset_kwargs", {})
    files = kwargs.get("data_files") or {}
    for split, file in files.items():
        for name in [file] if isinstance(file, str) else file:
            if not (data_dir / name).is_file():
                raise EvalError(f"task {config['task']}: {data_dir / name} not found (its {split} split)")
    kwargs["data_dir"] = str(data_dir)
    return config


def skill_config(name: str, data_dir: Path, manager: TaskManager) -> dict[str, Any]:
    """The full config of skill task ``name`` (shipped YAML, else the template) reading from ``data_dir``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if _is_shipped(manager, name):
        path = manager.task_index[name].yaml_path
        return _with_data_dir(load_yaml(path, resolve_func=True), data_dir)
    skill = name.removeprefix(PREFIX)
    config = load_yaml(TEMPLATE, resolve_func=True)
    config.update(task=name, dataset_kwargs={"data_files": {"test": f"{skill}-test.jsonl"}})
    config["generation_kwargs"] = {**config["generation_kwargs"], "max_gen_toks": DEFAULT_MAX_GEN_TOKS}
    return _with_data_dir(config, data_dir)


def _unknown(names: Sequence[str], manager: TaskManager) -> EvalError:
    import lm_eval.tasks

    builtin = Path(lm_eval.tasks.__file__).resolve().parent
    ours = [name for name in manager.all_tasks if _is_shipped(manager, name) or name == SKILLS_TAG]
    yours = sorted(
        name
        for name, entry in manager.task_index.items()
        if name not in ours and entry.yaml_path is not None and builtin not in Path(entry.yaml_path).resolve().parents
    )
    listed = ", ".join([*ours, *yours])
    return EvalError(
        f"unknown task {', '.join(names)}; available: {listed}, fedfuse_<name> for a <name>-test.jsonl in "
        "--data-dir, or any lm-eval task (lm-eval ls tasks; your own YAML folders with --include-path)"
    )


def select(
    names: Sequence[str],
    *,
    data_dir: Path | None = None,
    include_paths: Sequence[Path] = (),
    on_index: Callable[[], None] | None = None,
) -> Selection:
    """Resolve task names into specs: fedfuse skill tasks get full configs reading from ``data_dir``.

    Parameters
    ----------
    names
        Task, group or tag names, in the order to run them (``fedfuse_skills`` expands to every skill).
    data_dir
        The folder of ``<skill>-test.jsonl`` files; needed only by fedfuse's skill tasks.
    include_paths
        Folders of the user's own lm-eval task YAMLs.
    on_index
        Called before lm-eval's built-in tasks are indexed (only when a name is found nowhere else).

    Raises
    ------
    EvalError
        On an empty or unknown task name (listing the available ones), a missing folder or data file.
    """
    from lm_eval.tasks._index import Kind

    wanted = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    if not wanted:
        raise EvalError("--tasks is empty: name one or more tasks, e.g. --tasks fedfuse_arithmetic,fedfuse_sort")
    manager = task_manager(include_paths)

    def resolvable(name: str) -> bool:
        has_file = data_dir is not None and (data_dir / f"{name.removeprefix(PREFIX)}-test.jsonl").is_file()
        return name in manager.all_tasks or (name.startswith(PREFIX) and has_file)

    if missing := [name for name in wanted if not resolvable(name)]:
        if on_index is not None:
            on_index()
        manager = task_manager(include_paths, defaults=True)
        if still := [name for name in missing if not resolvable(name)]:
            raise _unknown(still, manager)
    specs: list[TaskSpec] = []
    for name in wanted:
        entry = manager.task_index.get(name)
        members = sorted(entry.tags) if entry is not None and entry.kind == Kind.TAG else []
        if members and all(_is_shipped(manager, member) for member in members):
            folder = _data_folder(data_dir, name)
            present = [m for m in members if (folder / f"{m.removeprefix(PREFIX)}-test.jsonl").is_file()]
            if not present:
                raise EvalError(f"task {name}: no <skill>-test.jsonl file of its skills in {folder}")
            specs += [skill_config(member, folder, manager) for member in present]
        elif _is_shipped(manager, name) or (entry is None and name.startswith(PREFIX)):
            specs.append(skill_config(name, _data_folder(data_dir, name), manager))
        else:
            specs.append(name)
    return Selection(tuple(specs), manager)

"""The README's examples run as written and print what the README says they print.

Every ```python block runs in a fresh interpreter in an empty folder. A ``print(...)`` whose line ends in
``# prints TEXT`` (or is followed by a line ``# prints: TEXT``) must print exactly TEXT (``…`` stands for
any text). Every block of ``$ command`` lines, each followed by its output, runs those commands on files
the test makes, and each must print the output shown.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README_TEXT = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README_TEXT, re.S)
PRINTS = re.compile(r"#\s*prints:?\s+(?P<text>.+?)\s*$")
SESSIONS = [block for block in re.findall(r"```[\w-]*\n(.*?)```", README_TEXT, re.S) if block.startswith("$ ")]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    "COLUMNS": "300",
    "NO_COLOR": "1",
    "TERM": "dumb",
    "RAY_TQDM_PATCH_PRINT": "0",  # Ray would swap builtins.print for its own, hiding a block's prints from the driver
}

DRIVER = """
import builtins, io, json, sys
source, record = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[:1]
_printed, _print = [], builtins.print

def _recording_print(*args, **kwargs):
    frame = sys._getframe(1)
    if frame.f_code.co_filename == "<readme>" and kwargs.get("file") in (None, sys.stdout):
        buffer = io.StringIO()
        _print(*args, **{**kwargs, "file": buffer})
        _printed.append((frame.f_lineno, buffer.getvalue()))
    _print(*args, **kwargs)

builtins.print = _recording_print
try:
    exec(compile(source, "<readme>", "exec"), sys.modules["__main__"].__dict__)
finally:
    with open(record, "w", encoding="utf-8") as out:
        json.dump(_printed, out)
"""
"""Runs a block as ``__main__`` (so ``"__main__:name"`` references work) and records each print's line."""


def expected_prints(block: str) -> list[tuple[range, str]]:
    """For each ``print(...)  # prints TEXT`` in ``block``: the lines its call spans, and TEXT."""
    calls = [
        range(node.lineno, (node.end_lineno or node.lineno) + 1)
        for node in ast.walk(ast.parse(block))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]
    lines = block.splitlines()
    expected = []
    for number, line in enumerate(lines, start=1):
        match = PRINTS.search(line)
        if not match:
            continue
        target = number
        if line.lstrip().startswith("#"):  # a comment line of its own speaks for the statement above it
            target = next(
                n
                for n in range(number - 1, 0, -1)
                if lines[n - 1].strip() and not lines[n - 1].lstrip().startswith("#")
            )
        span = next((span for span in calls if target in span), None)
        assert span is not None, f"line {number} has '# prints' but no print(...) call:\n{line}"
        expected.append((span, match["text"]))
    return expected


def matches(expected: str, printed: str) -> bool:
    """``printed`` is ``expected`` (whitespace runs compared as one space), ``…`` matching any text."""
    pattern = ".*".join(re.escape(" ".join(part.split())) for part in expected.split("…"))
    return re.fullmatch(pattern, " ".join(printed.split()), re.S) is not None


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 4


def test_readme_states_printed_results_to_check() -> None:
    assert sum(len(expected_prints(block)) for block in BLOCKS) >= 5
    assert SESSIONS, "the README shows no '$ command' with its output"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_and_prints_what_it_says(index: int, tmp_path: Path) -> None:
    block, workdir, record = BLOCKS[index], tmp_path / "cwd", tmp_path / "printed.json"
    workdir.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, block, str(record)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert result.returncode == 0, f"README block {index} failed:\n{block}\n{result.stderr[-3000:]}"
    printed = json.loads(record.read_text(encoding="utf-8"))
    for span, text in expected_prints(block):
        outputs = [output for line, output in printed if line in span]
        assert len(outputs) == 1, f"README block {index}, line {span.start}: printed {len(outputs)} times"
        assert matches(text, outputs[0]), (
            f"README block {index}, line {span.start} says it prints\n  {text}\nbut printed\n  {outputs[0]}"
        )


def _tiny_berts(folder: Path) -> None:
    """./base and ./ft-a (2 layers, same architecture) and ./other-arch (1 layer) for `fedfuse merge`."""
    from transformers import BertConfig, BertModel

    def bert(layers: int, seed: int, noise: float) -> BertModel:
        torch.manual_seed(0)
        model = BertModel(
            BertConfig(
                hidden_size=32,
                num_hidden_layers=layers,
                num_attention_heads=2,
                intermediate_size=37,
                vocab_size=100,
                max_position_embeddings=64,
            )
        )
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(noise * torch.randn(parameter.shape, generator=generator))
        return model

    bert(2, 0, 0.0).save_pretrained(folder / "base")
    bert(2, 1, 0.02).save_pretrained(folder / "ft-a")
    bert(1, 2, 0.02).save_pretrained(folder / "other-arch")


SETUPS: dict[str, Callable[[Path], None]] = {"fedfuse merge": _tiny_berts}
"""How to make the files each README session's command reads, by the command's first two words."""


def _commands(session: str) -> list[tuple[str, str]]:
    """(command, the output the README shows after it) for each ``$`` line of a session block."""
    pairs: list[tuple[str, list[str]]] = []
    for line in session.splitlines():
        if line.startswith("$ "):
            pairs.append((line[2:], []))
        else:
            pairs[-1][1].append(line)
    return [(command, "\n".join(output)) for command, output in pairs]


@pytest.mark.parametrize("index", range(len(SESSIONS)))
def test_readme_command_prints_what_it_says(index: int, tmp_path: Path) -> None:
    for command, shown in _commands(SESSIONS[index]):
        words = shlex.split(command)
        setup = SETUPS.get(" ".join(words[:2]))
        assert setup is not None, f"no setup in this test for the README command {command!r}"
        setup(tmp_path)
        assert words[0] == "fedfuse"
        result = subprocess.run(
            [sys.executable, "-c", "from fedfuse.cli.main import app; app(prog_name='fedfuse')", *words[1:]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env=ENV,
        )
        printed = (result.stdout + result.stderr).strip()
        assert matches(shown, printed), f"README shows after `{command}`:\n{shown}\nbut it printed:\n{printed}"

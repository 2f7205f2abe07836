"""The docs' examples run as written and print what the docs say they print; the site builds with --strict.

The pages are README.md, CONTRIBUTING.md and every docs/**/*.md, found when the tests are collected. Every
```python block runs in an empty folder, in a new ``__main__`` of its own process, forked from one warm
interpreter (tests/docs_runner.py). A ``print(...)`` whose line ends in
``# prints TEXT`` (or is followed by a line ``# prints: TEXT``) must print exactly TEXT (``…`` stands for
any text). Every block of ``$ command`` lines, each followed by its output, runs those commands on files
the test makes, and each must print the output shown. A block right after ``<!-- not run: reason -->`` or
``<!-- runs in tests/test_x.py -->`` is not run here (tests/test_docs_reference.py checks those comments).
Test ids name the page and the block's index among the page's fenced blocks: ``guides/offline.md#3``.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PRINTS = re.compile(r"#\s*prints:?\s+(?P<text>.+?)\s*$")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
COMMENT = re.compile(r"^\s*<!--\s*(?P<text>.*?)\s*-->\s*$")
SHELL_LANGS = frozenset({"bash", "sh", "shell", "console", "zsh"})
"""Fence languages of shell blocks: each runs as a ``$`` session or says why not (or where it runs)."""

ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    "COLUMNS": "300",
    "NO_COLOR": "1",
    "TERM": "dumb",
    "RAY_TQDM_PATCH_PRINT": "0",  # Ray would swap builtins.print for its own, hiding a block's prints from the driver
    "NO_MKDOCS_2_WARNING": "1",
}


@dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    page: str
    """The page, relative to docs/ (``guides/offline.md``), or ``README.md`` / ``CONTRIBUTING.md``."""
    index: int
    """Its index among the page's fenced blocks (0-based)."""
    lang: str
    text: str
    """The block's lines, the fence's indentation removed."""
    comment: str | None
    """The ``<!-- ... -->`` line right before the fence (blank lines allowed between), or None."""

    @property
    def id(self) -> str:
        return f"{self.page}#{self.index}"

    @property
    def is_session(self) -> bool:
        """A ``$ command`` session: commands with the output each prints."""
        return self.text.startswith("$ ")

    @property
    def marked(self) -> bool:
        """Whether a comment says the block is not run here (``not run: …`` or ``runs in …``)."""
        return self.comment is not None and self.comment.startswith(("not run", "runs in"))


def pages() -> list[Path]:
    """README.md, CONTRIBUTING.md and every docs page, as they are now."""
    return [path for path in (ROOT / "README.md", ROOT / "CONTRIBUTING.md") if path.is_file()] + sorted(
        DOCS.rglob("*.md")
    )


def page_name(path: Path) -> str:
    return str(path.relative_to(DOCS if path.is_relative_to(DOCS) else ROOT))


def parse_blocks(page: str, text: str) -> list[Block]:
    """The fenced blocks of a page's markdown, in order (fences indented in lists included)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        if opening is None:
            number += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        body, number = [], number + 1
        while number < len(lines) and not lines[number].strip().startswith(fence):
            body.append(lines[number][len(indent) :] if lines[number].startswith(indent) else lines[number])
            number += 1
        previous = _previous_line(lines, number - len(body) - 1)
        comment = COMMENT.match(previous) if previous is not None else None
        blocks.append(
            Block(page, len(blocks), opening["lang"], "\n".join(body) + "\n", comment["text"] if comment else None)
        )
        number += 1
    return blocks


def _previous_line(lines: list[str], fence_line: int) -> str | None:
    """The last non-blank line before line ``fence_line``, or None."""
    return next((lines[n] for n in range(fence_line - 1, -1, -1) if lines[n].strip()), None)


@cache
def all_blocks() -> tuple[Block, ...]:
    return tuple(block for path in pages() for block in parse_blocks(page_name(path), path.read_text(encoding="utf-8")))


PYTHON = [block for block in all_blocks() if block.lang == "python" and not block.marked]
SESSIONS = [block for block in all_blocks() if block.is_session]


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


def test_the_docs_have_python_examples() -> None:
    assert len(PYTHON) >= 4


def test_the_docs_state_printed_results_to_check() -> None:
    assert sum(len(expected_prints(block.text)) for block in PYTHON) >= 5
    assert SESSIONS, "the docs show no '$ command' with its output"


def _python(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """This interpreter run with ``args`` in ``cwd`` (the docs' environment, output captured, 300 s at most)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV)


class BlockRunner:
    """tests/docs_runner.py, started once: each block runs in a child forked from its warm interpreter."""

    def __init__(self, log: Path) -> None:
        self.log = log
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "docs_runner.py")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=ENV,
                cwd=ROOT,
                bufsize=0,
            )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin, self.stdout = self.process.stdin, self.process.stdout.fileno()
        self.buffer = b""

    def run(self, source: str, folder: Path, timeout: float = 300) -> tuple[int | str, str]:
        """Run ``source`` in ``folder/cwd``: its exit code (or ``"timed out"``) and its stderr; prints recorded."""
        (folder / "cwd").mkdir(parents=True)
        request = {name: str(folder / name) for name in ("cwd", "stdout", "stderr")}
        self.stdin.write(
            (json.dumps({**request, "source": source, "record": str(folder / "printed.json")}) + "\n").encode()
        )
        self.stdin.flush()
        pid = self._answer(120)["pid"]
        try:
            code: int | str = self._answer(timeout)["exit"]
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            self._answer(60)
            code = "timed out"
        return code, (folder / "stderr").read_text(errors="replace")

    def _answer(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = end - time.monotonic()
            if remaining <= 0 or not select.select([self.stdout], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(self.stdout, 65536)
            assert chunk, f"the docs runner stopped:\n{self.log.read_text(errors='replace')[-3000:]}"
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def close(self) -> None:
        self.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def block_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockRunner]:
    runner = BlockRunner(tmp_path_factory.mktemp("docs-runner") / "runner.log")
    try:
        yield runner
    finally:
        runner.close()


@pytest.mark.parametrize("block", PYTHON, ids=lambda block: block.id)
def test_a_python_block_runs_and_prints_what_it_says(block: Block, tmp_path: Path, block_runner: BlockRunner) -> None:
    code, stderr = block_runner.run(block.text, tmp_path)
    assert code == 0, f"{block.id} failed ({code}):\n{block.text}\n{stderr[-3000:]}"
    printed = json.loads((tmp_path / "printed.json").read_text(encoding="utf-8"))
    for span, text in expected_prints(block.text):
        outputs = [output for line, output in printed if line in span]
        assert len(outputs) == 1, f"{block.id}, line {span.start}: printed {len(outputs)} times"
        assert matches(text, outputs[0]), (
            f"{block.id}, line {span.start} says it prints\n  {text}\nbut printed\n  {outputs[0]}"
        )


def _tiny_berts(folder: Path) -> None:
    """./base and ./ft-a (2 layers, same architecture) and ./other-arch (1 layer) for `fedfuse merge`."""
    import torch
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
"""How to make the files each docs session's command reads, by the command's first two words."""


def _commands(session: str) -> list[tuple[str, str]]:
    """(command, the output the docs show after it) for each ``$`` line of a session block."""
    pairs: list[tuple[str, list[str]]] = []
    for line in session.splitlines():
        if line.startswith("$ "):
            pairs.append((line[2:], []))
        else:
            pairs[-1][1].append(line)
    return [(command, "\n".join(output)) for command, output in pairs]


@pytest.mark.parametrize("block", SESSIONS, ids=lambda block: block.id)
def test_a_command_prints_what_the_docs_say(block: Block, tmp_path: Path) -> None:
    for command, shown in _commands(block.text):
        words = shlex.split(command)
        setup = SETUPS.get(" ".join(words[:2]))
        assert setup is not None, f"{block.id}: no setup in this test for the command {command!r}"
        setup(tmp_path)
        assert words[0] == "fedfuse"
        result = _python(["-c", "from fedfuse.cli.main import app; app(prog_name='fedfuse')", *words[1:]], tmp_path)
        printed = (result.stdout + result.stderr).strip()
        assert matches(shown, printed), f"{block.id} shows after `{command}`:\n{shown}\nbut it printed:\n{printed}"


def test_the_site_builds_with_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict``: every nav page exists, every link resolves, the API reference renders."""
    result = _python(["-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path / "site")], cwd=ROOT)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert (tmp_path / "site" / "reference" / "methods" / "index.html").is_file()


def test_a_block_runs_in_a_main_of_its_own_and_a_stuck_one_is_stopped(
    tmp_path: Path, block_runner: BlockRunner
) -> None:
    """The warm interpreter's own names do not leak into a block, and a block past its time is killed."""
    code, stderr = block_runner.run("print(json.dumps(1))\n", tmp_path / "forgot-an-import")
    assert code == 1 and "NameError: name 'json' is not defined" in stderr
    code, _ = block_runner.run("import time\ntime.sleep(600)\n", tmp_path / "stuck", timeout=1)
    assert code == "timed out"
    code, _ = block_runner.run("import sys\nprint(sys.argv)  # prints ['-c']\n", tmp_path / "after")
    assert code == 0 and json.loads((tmp_path / "after" / "printed.json").read_text()) == [[2, "['-c']\n"]]

"""Runs the docs' Python blocks for tests/test_docs_examples.py, each in a forked child of one warm interpreter.

This process imports once what nearly every block imports (torch, Flower, fedfuse with its simulation); each
block then runs in a child forked from it, in a new ``__main__`` module (a block that forgets an import fails
as it would for a reader), in its own folder and session, with its own stdout and stderr files and its
prints recorded by line. A fresh interpreter per block spent most of the docs tests' time importing.

Requests and answers are JSON lines on stdin and stdout: ``{"source", "record", "cwd", "stdout", "stderr"}``
→ ``{"pid": …}`` when the child starts, then ``{"exit": …}`` when it ends.
"""

from __future__ import annotations

import atexit
import builtins
import io
import json
import os
import sys
import traceback
import types
from typing import Any

import torch  # noqa: F401

import fedfuse.flower
import fedfuse.simulation  # noqa: F401


def _recording_print(printed: list[tuple[int, str]], original: Any) -> Any:
    """``print`` that also records, for each call made by the block itself, its line and what it printed."""

    def print_and_record(*args: Any, **kwargs: Any) -> None:
        frame = sys._getframe(1)
        if frame.f_code.co_filename == "<docs>" and kwargs.get("file") in (None, sys.stdout):
            buffer = io.StringIO()
            original(*args, **{**kwargs, "file": buffer})
            printed.append((frame.f_lineno, buffer.getvalue()))
        original(*args, **kwargs)

    return print_and_record


def _redirect(request: dict[str, str]) -> None:
    """The child's stdin from /dev/null, stdout and stderr into the request's files, in the request's folder."""
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
    os.chdir(request["cwd"])


def run_block(request: dict[str, str]) -> int:
    """Run one block as ``__main__`` (so ``"__main__:name"`` references work); its exit code."""
    os.setsid()  # its own session: a timed-out block is killed with everything it started (Ray included)
    _redirect(request)
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    sys.argv = ["-c"]
    printed: list[tuple[int, str]] = []
    builtins.print = _recording_print(printed, builtins.print)
    code = 0
    try:
        exec(compile(request["source"], "<docs>", "exec"), main.__dict__)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with open(request["record"], "w", encoding="utf-8") as out:
            json.dump(printed, out)
    atexit._run_exitfuncs()  # what a fresh interpreter does on its way out (Ray's shutdown among them)
    return code


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                code = run_block(request)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()

"""What a new user sees first, and ``--client-gpus``.

``fedfuse simulate`` must open with the run, not with notices about library internals: the known
third-party warnings (Flower's ``run_simulation`` deprecation, transformers' ``is_gradient_checkpointing``
and Ray's accelerator FutureWarning) are silenced by their exact source, and every other warning still
shows. ``--client-gpus`` gives each client a share of the GPUs through Ray; asking for GPUs without CUDA is
a one-line error before anything starts.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

import pytest
from typer.testing import CliRunner

from fedfuse import simulation
from fedfuse.cli.main import app
from fedfuse.known_warnings import KNOWN_WARNINGS, known_warnings_silenced
from fedfuse.simulation import ClientResourcesError, backend_config, simulate

# Tiers are marked per test here: this module mixes e2e and integration and unit tests.

WARNING_LINE = re.compile(r"warning|DEPRECATED", re.IGNORECASE)


def warning_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if WARNING_LINE.search(line)]


# The first screen of a real run (no warning, the rounds counted) is checked on the README's first command
# itself, ``fedfuse simulate`` with no arguments, installed from the wheel: tests/test_wheel.py.


@pytest.mark.unit
def test_known_warnings_are_hidden_and_others_still_show():
    known = KNOWN_WARNINGS[0]
    with known_warnings_silenced(), warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit(known.message + " and more", known.category, "m.py", 1, module=known.module)
        warnings.warn_explicit("an unrelated notice", known.category, "m.py", 2, module=known.module)
        warnings.warn_explicit(known.message + " from elsewhere", known.category, "m.py", 3, module="mylib")
        warnings.warn_explicit(known.message + " as a UserWarning", UserWarning, "m.py", 4, module=known.module)
    assert [str(w.message) for w in caught] == [
        "an unrelated notice",
        known.message + " from elsewhere",
        known.message + " as a UserWarning",
    ]


@pytest.mark.unit
def test_the_real_transformers_notice_is_hidden_only_inside():
    from transformers import BertConfig, BertModel

    model = BertModel(
        BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    )
    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        _ = model.is_gradient_checkpointing
    with known_warnings_silenced(), warnings.catch_warnings(record=True) as inside:
        _ = model.is_gradient_checkpointing
    assert [w.category for w in outside] == [FutureWarning]
    assert inside == []


@pytest.mark.e2e
def test_child_processes_hide_the_worker_notices_and_still_show_others():
    known = next(k for k in KNOWN_WARNINGS if k.in_workers)
    script = (
        "import warnings\n"
        f"warnings.warn_explicit({known.message!r} + ' x', FutureWarning, 'm.py', 1, module={known.module!r})\n"
        f"warnings.warn_explicit('an unrelated notice', FutureWarning, 'm.py', 2, module={known.module!r})\n"
    )
    before = os.environ.get("PYTHONWARNINGS")
    with known_warnings_silenced():
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=60)
    assert os.environ.get("PYTHONWARNINGS") == before
    assert "an unrelated notice" in done.stderr
    assert known.message not in done.stderr


@pytest.mark.unit
def test_flowers_run_simulation_deprecation_is_dropped_and_other_flower_warnings_kept():
    from flwr.supercore.logger import warn_deprecated_feature

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    flower = logging.getLogger("flwr")
    flower.addHandler(handler)
    try:
        with known_warnings_silenced():
            warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
            warn_deprecated_feature("Something else is deprecated")
            flower.warning("a Flower warning")
        warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
    finally:
        flower.removeHandler(handler)
    assert [text.split("\n")[0] for text in seen] == [
        "DEPRECATED FEATURE: Something else is deprecated",
        "a Flower warning",
        "DEPRECATED FEATURE: The `run_simulation` function is deprecated and will be removed",
    ]


# --client-gpus


@pytest.mark.unit
def test_cpu_clients_get_no_gpu_and_ray_gets_none():
    config = backend_config(parallel=2, client_gpus=0.0, gpus=0)
    assert config["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    assert config["init_args"]["num_cpus"] == 2 and config["init_args"]["num_gpus"] == 0


@pytest.mark.unit
def test_gpu_clients_get_their_share_and_ray_gets_every_visible_gpu():
    config = backend_config(parallel=4, client_gpus=0.5, gpus=2)
    assert config["client_resources"] == {"num_cpus": 1, "num_gpus": 0.5}
    assert config["init_args"]["num_gpus"] == 2
    assert backend_config(parallel=1, client_gpus=2, gpus=3)["client_resources"]["num_gpus"] == 2.0


@pytest.mark.unit
@pytest.mark.parametrize(
    ("client_gpus", "gpus", "message"),
    [
        (0.5, 0, "--client-gpus 0.5 asks for GPUs but torch sees no CUDA device"),
        (2.0, 1, "--client-gpus 2 asks for more GPUs per client than the 1 CUDA device(s) torch sees"),
        (1.5, 2, "--client-gpus 1.5: above 1, GPUs per client must be a whole number (Ray's rule)"),
        (-1.0, 1, "--client-gpus -1: GPUs per client must be 0 or more"),
    ],
)
def test_impossible_gpu_requests_are_refused(client_gpus, gpus, message):
    with pytest.raises(ClientResourcesError) as caught:
        backend_config(parallel=1, client_gpus=client_gpus, gpus=gpus)
    assert str(caught.value) == message


@pytest.mark.unit
def test_simulate_asking_for_gpus_without_cuda_fails_before_anything_starts(monkeypatch, tmp_path):
    monkeypatch.setattr(simulation, "visible_gpus", lambda: 0)
    monkeypatch.setattr(simulation, "make_server_app", lambda *a: pytest.fail("the server app was built"))
    with pytest.raises(ClientResourcesError, match="torch sees no CUDA device"):
        simulate({"output-dir": str(tmp_path / "run")}, num_clients=2, client_gpus=0.5)
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_the_cli_says_so_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(simulation, "visible_gpus", lambda: 0)
    monkeypatch.setattr(simulation, "make_server_app", lambda *a: pytest.fail("the server app was built"))
    result = CliRunner().invoke(
        app, ["simulate", "--client-gpus", "0.5", "-o", str(tmp_path / "run")], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 2
    assert "--client-gpus 0.5 asks for GPUs but torch sees no CUDA device" in result.output
    assert "Traceback" not in result.output


@pytest.mark.unit
def test_cuda_clients_without_client_gpus_are_refused_before_anything_starts():
    from fedfuse.simulation import ClientResourcesError, simulate

    with pytest.raises(ClientResourcesError, match="client-device 'cuda' needs --client-gpus > 0"):
        simulate({"client-device": "cuda"}, num_clients=2)

"""``fedfuse eval``: a tiny local chat Llama through lm-evaluation-harness on skill files, offline.

The model is a 2-layer Llama built from a config (nothing downloaded), with a chat template and an
eos token. Exact match is checked against answers made from the model's own greedy generations (so
it must be 1.0) and against answers it cannot produce (so it must be 0.0); every run happens with
sockets refusing to connect, so an attempted download fails the test.
"""

from __future__ import annotations

import json
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from own_data_helpers import tiny_chat_llama
from transformers import AutoTokenizer
from typer.testing import CliRunner

from fedfuse.cli.main import app

# Tiers are marked per test here: this module mixes integration and unit tests.

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = {
    "arithmetic": [(f"What is {a} + {b}? Answer with the number only.", str(a + b)) for a, b in [(12, 30), (45, 11)]]
    + [("What is 70 + 21? Answer with the number only.", "91")],
    "sort": [("Sort these numbers in ascending order: 9, 3, 5. Answer with the sorted list only.", "3, 5, 9")] * 3,
    "echo": [(f"Say the word number {i}.", f"word {i}") for i in range(4)],
}
"""A few rows per skill in the skill-file format (``echo`` has no shipped YAML: the template task)."""


def write_skill_dir(folder: Path, rows: dict[str, list[tuple[str, str]]]) -> Path:
    """``<folder>/<skill>-test.jsonl`` chat records, as ``fedfuse.data.skills.write_skill_files`` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    for skill, pairs in rows.items():
        lines = [
            json.dumps(
                {
                    "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                    "skill": skill,
                }
            )
            for prompt, answer in pairs
        ]
        (folder / f"{skill}-test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The own-data tiny chat Llama, with ``[SEP]`` (which ends each chat turn) as its eos token."""
    folder = tiny_chat_llama(tmp_path_factory.mktemp("tiny-chat-llama"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any TCP/UDP connection attempt raises (unix sockets stay allowed)."""
    connect = socket.socket.connect

    def refuse(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"fedfuse eval tried to connect to {address}")
        connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: refuse(socket.socket(), a[0]))


def run_eval(*args: str) -> Any:
    return CliRunner().invoke(app, ["eval", *args], env={"COLUMNS": "200"})


def evaluate(model: Path, data: Path, tasks: str, out: Path, *extra: str) -> dict[str, Any]:
    pytest.importorskip("lm_eval")
    result = run_eval(
        str(model), "--tasks", tasks, "--data-dir", str(data), "--device", "cpu", "--out", str(out), *extra
    )
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


@pytest.mark.integration
def test_eval_reports_exact_match_per_task(model_dir: Path, tmp_path: Path, no_network: None) -> None:
    data = write_skill_dir(tmp_path / "skills", {k: PROMPTS[k] for k in ("arithmetic", "sort")})
    results = evaluate(model_dir, data, "fedfuse_arithmetic,fedfuse_sort", tmp_path / "r.json", "--limit", "2")
    assert set(results["tasks"]) == {"fedfuse_arithmetic", "fedfuse_sort"}
    for metrics in results["tasks"].values():
        assert 0.0 <= metrics["exact_match"] <= 1.0
        assert metrics["samples"] == 2
    assert results["chat_template"] is True
    assert (
        results["results"]["fedfuse_arithmetic"]["exact_match,none"]
        == results["tasks"]["fedfuse_arithmetic"]["exact_match"]
    )


@pytest.mark.integration
def test_exact_match_is_one_on_the_models_own_answers_and_zero_on_others(
    model_dir: Path, tmp_path: Path, no_network: None
) -> None:
    probe_dir = write_skill_dir(tmp_path / "probe", PROMPTS)
    probe = evaluate(model_dir, probe_dir, "fedfuse_echo", tmp_path / "a.json", "--samples")
    rows = sorted(probe["samples"]["fedfuse_echo"], key=lambda row: row["doc_id"])
    assert [row["target"] for row in rows] == [answer for _, answer in PROMPTS["echo"]]
    assert rows[0]["prompt"].startswith("<|user|> Say the word number 0.")  # through the chat template
    assert probe["tasks"]["fedfuse_echo"]["exact_match"] == 0.0  # a random model does not say "word 0"
    prompts = [prompt for prompt, _ in PROMPTS["echo"]]
    own = [(prompt, row["generation"]) for prompt, row in zip(prompts, rows, strict=True)]
    wrong = [(prompt, f"not {row['generation']}") for prompt, row in zip(prompts, rows, strict=True)]
    for name, pairs, expected in (("own", own, 1.0), ("wrong", wrong, 0.0)):
        data = write_skill_dir(tmp_path / name, {"echo": pairs})
        results = evaluate(model_dir, data, "fedfuse_echo", tmp_path / f"{name}.json")
        assert results["tasks"]["fedfuse_echo"]["exact_match"] == expected, (name, rows)


@pytest.mark.integration
def test_a_users_own_task_folder_with_include_path(model_dir: Path, tmp_path: Path, no_network: None) -> None:
    data = write_skill_dir(tmp_path / "data", {"echo": PROMPTS["echo"]})
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "my_echo.yaml").write_text(
        "task: my_echo\noutput_type: generate_until\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data / 'echo-test.jsonl'}\ntest_split: test\n"
        'doc_to_text: "{{messages[0].content}}"\ndoc_to_target: "{{messages[1].content}}"\n'
        "generation_kwargs:\n  until: ['\\n\\n']\n  do_sample: false\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    results = evaluate(model_dir, data, "my_echo,fedfuse_echo", tmp_path / "r.json", "--include-path", str(tasks))
    assert results["tasks"]["my_echo"]["exact_match"] == 0.0
    assert results["tasks"]["my_echo"]["samples"] == 4
    assert "fedfuse_echo" in results["tasks"]


def one_line_error(result: Any) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.integration
def test_errors_are_one_line_with_exit_code_2(model_dir: Path, tmp_path: Path, no_network: None) -> None:
    pytest.importorskip("lm_eval")
    data = write_skill_dir(tmp_path / "data", {"arithmetic": PROMPTS["arithmetic"]})
    line = one_line_error(run_eval(str(model_dir), "--tasks", "no_such_task", "--data-dir", str(data)))
    assert "unknown task no_such_task" in line and "fedfuse_arithmetic" in line and "fedfuse_sort" in line
    line = one_line_error(run_eval(str(model_dir), "--tasks", "fedfuse_arithmetic"))
    assert "--data-dir" in line
    line = one_line_error(run_eval(str(model_dir), "--tasks", "fedfuse_arithmetic", "--data-dir", str(tmp_path / "x")))
    assert "no such folder" in line
    line = one_line_error(run_eval(str(model_dir), "--tasks", "fedfuse_sort", "--data-dir", str(data)))
    assert "sort-test.jsonl not found" in line
    line = one_line_error(run_eval(str(data), "--tasks", "fedfuse_arithmetic", "--data-dir", str(data)))
    assert "not a Hugging Face model folder" in line
    line = one_line_error(run_eval(str(tmp_path / "none"), "--tasks", "fedfuse_arithmetic", "--data-dir", str(data)))
    assert "no model folder" in line


@pytest.mark.integration
def test_without_lm_eval_it_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    line = one_line_error(run_eval(str(model_dir), "--tasks", "fedfuse_arithmetic"))
    assert 'pip install "fedfuse[eval]"' in line


@pytest.mark.unit
def test_the_skill_metric_checks_answers_like_the_skills_module() -> None:
    from fedfuse.eval.task_files import skill_utils

    doc = {"messages": [{"role": "user", "content": "What is 40 + 45?"}, {"role": "assistant", "content": "85"}]}
    assert skill_utils.doc_to_text(doc) == "What is 40 + 45?"
    assert skill_utils.process_results(doc, ["85.\nbecause"]) == {"exact_match": 1.0}
    assert skill_utils.process_results(doc, ["86"]) == {"exact_match": 0.0}
    assert skill_utils.doc_to_target({"prompt": "p", "response": "r"}) == "r"
    with pytest.raises(ValueError, match="messages"):
        skill_utils.doc_to_text({"text": "x"})


@pytest.mark.unit
def test_every_skill_has_a_shipped_task_and_the_yamls_are_package_data() -> None:
    import yaml

    from fedfuse.data.skills import SKILLS
    from fedfuse.eval import TASKS_DIR, shipped_tasks

    assert shipped_tasks() == sorted(f"fedfuse_{name}" for name in SKILLS)
    for name, skill in SKILLS.items():
        config = yaml.safe_load((TASKS_DIR / f"fedfuse_{name}.yaml").read_text())
        assert config["task"] == f"fedfuse_{name}"
        assert config["dataset_kwargs"]["data_files"] == {"test": f"{name}-test.jsonl"}
        assert config["generation_kwargs"]["max_gen_toks"] == skill.max_new_tokens
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-data"]["fedfuse.eval.task_files"] == ["*.yaml"]
    extras = pyproject["project"]["optional-dependencies"]
    assert any(req.startswith("lm-eval") for req in extras["eval"])
    assert any(req.startswith("lm-eval") for req in extras["dev"])

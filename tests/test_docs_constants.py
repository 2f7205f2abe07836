"""Numbers, defaults and lists the docs state are the code's: one row per claim, so drift fails the suite.

Each row names a doc, a pattern whose groups capture what the doc says, and the code's value. ``DOCS`` rows
are searched in every page (README.md, CONTRIBUTING.md, docs/**/*.md, found when the test runs), so a fact
may move between pages; every page that states it must state the code's value. The generated reference
pages (tests/test_docs_reference.py) and the names the docs cite (tests/test_architecture_doc.py) are
checked elsewhere; these are the claims written in prose.
"""

from __future__ import annotations

import ast
import inspect
import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from fedfuse import messages
from fedfuse.algebra import sparsifiers
from fedfuse.algebra.server_optim import DEFAULT_SERVER_LR, SERVER_OPTIMIZERS
from fedfuse.algebra.sparsifiers import registered_sparsifiers
from fedfuse.bench import aggregate, merge_quality_experts, merge_quality_report, overhead, quality, robust, wire
from fedfuse.bench.merge_quality import merge_quality
from fedfuse.cli.eval import eval_command
from fedfuse.client import mods
from fedfuse.client.mods import task_vector_mod
from fedfuse.client.residuals import KEPT_ROUNDS, STATE_DIR_ENV
from fedfuse.data.skills import _SPLIT_EDGES
from fedfuse.data.stdlib_topics import LABEL_NAMES
from fedfuse.messages import ReplyRejected
from fedfuse.offline.request import REQUESTS, ModelsRequest
from fedfuse.rejections import ROUND_REASONS, WIRE_REASONS
from fedfuse.rounds.policy import DEFAULT_MAX_NUM_EXAMPLES
from fedfuse.security.signing import STATEMENT_VERSION
from fedfuse.server.fedmerge import FedMerge
from fedfuse.server.flower_names import FLOWER_OPTIMIZER_DEFAULTS
from fedfuse.settings import RunSettings
from fedfuse.settings.attack import ATTACKS
from fedfuse.settings.run_settings import AUTO_FISHER_BATCHES, SECTION_OF, SECTIONS
from fedfuse.settings.source import AUTO_MAX_LENGTH
from fedfuse.settings.training import AUTO_LEARNING_RATE, AUTO_TARGET_MODULES
from fedfuse.simulation import DEFAULT_CLIENTS
from fedfuse.strategies import registry as strategy_registry
from fedfuse.strategies.fisher import FisherMerge
from fedfuse.strategies.krum import Krum
from fedfuse.strategies.params import LAM
from fedfuse.strategies.regmean import RegMean
from fedfuse.strategies.spilled import CHUNK_BYTES
from fedfuse.strategies.trimmed_mean import TrimmedMean
from fedfuse.timing import CLIENT_PHASES, SERVER_PHASES
from fedfuse.training.client_datasets import CACHED_CLIENT_DATASETS
from fedfuse.training.federated_dataset import MIN_CLIENT_EXAMPLES
from fedfuse.training.run_model import HEAD_PREFIXES
from fedfuse.training.trainers import registry as trainer_registry
from fedfuse.wire.header import ENCODINGS, FORMAT_VERSION, MAX_NUM_EXAMPLES
from fedfuse.wire.values import UPDATE_VALUE_DTYPES

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
DOCS, ARCH, COST = "docs", "docs/architecture.md", "docs/cost-model.md"
"""``DOCS``: any page of the docs (README.md included); ARCH and COST: that page."""
MIB = 2**20
DEFAULTS = RunSettings().to_run_config()
BUILT_IN_SPARSIFIERS = frozenset(s.name for s in registered_sparsifiers() if s.fn.__module__.startswith("fedfuse."))
WORD = r"\b(?!and\b)(\w+)"
"""A name in a plain comma list (``build, data, train and sign``)."""
WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}


def _param(strategy: type, name: str) -> Any:
    """The declared default of a strategy's own parameter."""
    return next(p.default for p in strategy.parameters if p.name == name)


def _default(fn: Any, name: str) -> Any:
    """A keyword's default in ``fn``'s signature (a typer option's default is the parameter's)."""
    return inspect.signature(fn).parameters[name].default


class Claim(NamedTuple):
    doc: str
    pattern: str
    """Each group captures one value the doc states (a number, a word, or a span of names); ``(?s)``: spans lines."""
    code: Any
    """The code's value; a tuple for several groups, a frozenset for a span of names."""
    names: str = r"`(\w+)`"
    """For a span of names: how one name is written in it."""


CLAIMS = (
    # chunk size of the spilled (robust) strategies
    Claim(DOCS, r"chunks of (\d+) MiB of K rows \(`CHUNK_BYTES`\)", CHUNK_BYTES / MIB),
    Claim(DOCS, r"The chunk is now (\d+) MiB \(`CHUNK_BYTES`", CHUNK_BYTES / MIB),
    Claim(DOCS, r"\| method, (\d+) MiB chunk \|", CHUNK_BYTES / MIB),
    Claim(ARCH, r"`CHUNK_BYTES` \((\d+) MiB\)", CHUNK_BYTES / MIB),
    # run-config defaults stated in prose
    Claim(
        DOCS,
        r"the embedded default: (\d+) clients, (\d+) rounds",
        (DEFAULT_CLIENTS, DEFAULTS["num-server-rounds"]),
    ),
    Claim(
        DOCS,
        r"(?s)(\d+)-class head on .*?Dirichlet\(α = ([\d.]+)\) non-IID over (\d+)\s+clients; each client trains "
        r"rank-(\d+) LoRA on `query`/`value` plus the head for (\d+) steps of (\d+) examples",
        (
            len(LABEL_NAMES),
            DEFAULTS["alpha"],
            DEFAULT_CLIENTS,
            DEFAULTS["lora-rank"],
            DEFAULTS["local-steps"],
            DEFAULTS["batch-size"],
        ),
    ),
    Claim(DOCS, r"round, (\w+) torch thread per client", DEFAULTS["client-threads"]),
    Claim(DOCS, r"with `transformers.Trainer` \((\d+) tokens per chat", AUTO_MAX_LENGTH["sft"]),
    Claim(DOCS, r"compute Fisher on (\d+) batches by default", AUTO_FISHER_BATCHES),
    Claim(
        DOCS,
        r"full rows fine-tune all of\s+MiniLM \(lr ([\d.e-]+);.*LoRA rows use rank (\d+) \(lr ([\d.e-]+)\)",
        (AUTO_LEARNING_RATE["full"], DEFAULTS["lora-rank"], AUTO_LEARNING_RATE["lora"]),
    ),
    Claim(
        COST,
        r"`AUTO_TARGET_MODULES`\s+keeps the `_proj` names\), which is (.*?) for SmolLM2",
        frozenset(name for name in AUTO_TARGET_MODULES if name.endswith("_proj")),
        r"(\w+_proj)",
    ),
    Claim(COST, r"the trained-head prefixes are `([\w.]+)` and `([\w.]+)`", HEAD_PREFIXES),
    Claim(
        DOCS,
        r"prompts split (\d+)/(\d+)/(\d+) into train/validation/test",
        tuple(
            round(100 * share) for share in (_SPLIT_EDGES[0], _SPLIT_EDGES[1] - _SPLIT_EDGES[0], 1 - _SPLIT_EDGES[1])
        ),
    ),
    Claim(DOCS, r"writes to `--output-dir`\s+\(default `([^`]+)`\)", DEFAULTS["output-dir"]),
    Claim(
        DOCS,
        r"By default a run keeps only the last round's weights \(`keep-checkpoints=(\d+)`\)",
        DEFAULTS["keep-checkpoints"],
    ),
    Claim(
        DOCS,
        r"\*\*`max-num-examples`\*\* \(default ([\d,]+)\)",
        DEFAULTS["max-num-examples"],
    ),
    Claim(DOCS, r"\*\*`max-num-examples`\*\* \(default ([\d,]+)\)", DEFAULT_MAX_NUM_EXAMPLES),
    Claim(COST, r"`lora-rank` defaults to (\d+)", DEFAULTS["lora-rank"]),
    Claim(COST, r"`wire-dtype` \(`fedfuse/settings/compression.py`: `(\w+)`, the default", DEFAULTS["wire-dtype"]),
    Claim(COST, r"Run-config `device = \"(\w+)\"` \(the default\)", DEFAULTS["device"]),
    # server optimizers
    Claim(
        DOCS,
        r"β₁ is `server-momentum` \(([\d.]+)\), β₂ `server-beta2` \(([\d.]+)\), τ `server-tau` \(([\d.e-]+)\)",
        (DEFAULTS["server-momentum"], DEFAULTS["server-beta2"], DEFAULTS["server-tau"]),
    ),
    Claim(
        DOCS,
        r"\(`\"auto\"`: ([\d.]+) for fedavgm, ([\d.]+) for fedadam, ([\d.]+) for fedyogi, Flower's defaults\)",
        (DEFAULT_SERVER_LR["fedavgm"], DEFAULT_SERVER_LR["fedadam"], DEFAULT_SERVER_LR["fedyogi"]),
    ),
    Claim(
        DOCS,
        r"FedMerge\(\"fedadam\", eta=([\d.]+), beta_1=([\d.]+), beta_2=([\d.]+), tau=([\d.e-]+)\)",
        tuple(FLOWER_OPTIMIZER_DEFAULTS["fedadam"][k] for k in ("lr", "momentum", "beta2", "tau")),
    ),
    # FedMerge and the mods
    Claim(DOCS, r"`dare` for the DARE presets, `none` otherwise; density ([\d.]+)\)", _default(FedMerge, "density")),
    Claim(
        DOCS,
        r"`task_vector_mod\(sparsifier=\"(\w+)\"\|\"dare\"\|\"none\", density=([\d.]+),\s+wire_dtype=\"(\w+)\", "
        r"error_feedback=(\w+), seed=(\d+), seed_scope=\"(\w+)\", node_name=(\w+)\)`",
        tuple(
            _default(task_vector_mod, k)
            for k in ("sparsifier", "density", "wire_dtype", "error_feedback", "seed", "seed_scope", "node_name")
        ),
    ),
    # strategies' declared defaults written outside the generated table
    Claim(DOCS, r"Common parameters: `lam` \(λ, default ([\d.]+)\)", LAM.default),
    Claim(DOCS, r"`trim` = β \(([\d.]+)\)", _param(TrimmedMean, "trim")),
    Claim(
        DOCS,
        r"`byzantine` = f \((\d+)\), `select` = m \((\d+) = Krum",
        (_param(Krum, "byzantine"), _param(Krum, "select")),
    ),
    Claim(ARCH, r"\| `lam`, `eps` = ([\d.e-]+) \|", _param(FisherMerge, "eps")),
    Claim(ARCH, r"\| `lam`, `alpha` = ([\d.]+) \|", _param(RegMean, "alpha")),
    # the wire format, rejections, signatures
    Claim(ARCH, r"`FORMAT_VERSION = (\d+)`", FORMAT_VERSION),
    Claim(ARCH, r"`MAX_NUM_EXAMPLES` = (10¹²)\]", MAX_NUM_EXAMPLES),
    Claim(ARCH, r"(?s)`ROUND_REASONS` \((.*?): the engine and the server\)", frozenset(ROUND_REASONS)),
    Claim(ARCH, r"`ReplyRejected`\s+\(`fedfuse/messages.py`: (.*?)\) subclass it", frozenset(ReplyRejected.allowed)),
    Claim(
        DOCS,
        r"(?s)fields left as `None` are not checked; .*? Reasons:\s+(.*?) for anything unforeseen",
        frozenset(WIRE_REASONS),
    ),
    Claim(ARCH, r"statement\(run_id, round, base_fingerprint, node, payload\)` = `([\w-]+)`", STATEMENT_VERSION),
    # settings, residuals, caches
    Claim(ARCH, r"RunSettings: the (\w+) sections", len(SECTIONS)),
    Claim(ARCH, r"`RunSettings` \(`fedfuse/settings/run_settings.py`\) has (\w+) frozen sections", len(SECTIONS)),
    Claim(
        ARCH,
        r"\| section \| class \| holds \|\n\|---\|---\|---\|\n((?:\| `settings\.\w+` .*\n)+)",
        frozenset(SECTIONS),
        r"`settings\.(\w+)`",
    ),
    Claim(ARCH, r"round-NNNN\.safetensors`, (\w+) rounds kept\)", KEPT_ROUNDS),
    Claim(
        DOCS,
        r"(?s)`state-dir` \(node config; default\s+`\$(\w+)`, or `~/.cache/fedfuse/node-state`.*?keyed by a\s+"
        r"run key that a resumed run keeps, (\w+) rounds at a time",
        (STATE_DIR_ENV, KEPT_ROUNDS),
    ),
    Claim(DOCS, r"a process now keeps its last (\d+) clients' tokenized", CACHED_CLIENT_DATASETS),
    Claim(DOCS, r"the Dirichlet floor of (\d+) examples per\s+client", MIN_CLIENT_EXAMPLES),
    Claim(ARCH, r"kept per process \(`load_client_datasets`, an\s+LRU of (\d+)", CACHED_CLIENT_DATASETS),
    # lists of names
    Claim(DOCS, r"(?s)`attack` \((.*?)\), `attackers`", frozenset(ATTACKS) - {"none"}),
    Claim(DOCS, r"\| `--sparsifier ([\w\\|]+)` \|", BUILT_IN_SPARSIFIERS, r"(\w+)"),
    Claim(DOCS, r"(?s)`fedfuse merge` has one subcommand per mode: (.*?); `fedfuse merge --help`", frozenset(REQUESTS)),
    Claim(
        ARCH,
        r"(?s)Encodings: (.*?) a\s+`SparseTensor` with `dare_seed`",
        frozenset(ENCODINGS),
        r"`(dense|bitmap|delta|dare)`",
    ),
    Claim(ARCH, r"\| `value_dtype` \| ([\w, ]+) for updates;", frozenset(UPDATE_VALUE_DTYPES), WORD),
    Claim(ARCH, r"(?s)A client times its\s+(.*?) phases and sends", frozenset(CLIENT_PHASES), WORD),
    Claim(ARCH, r"(?s)times its own (.*?); the ServerApp adds", frozenset(SERVER_PHASES[:-2]), WORD),
    Claim(ARCH, r"the ServerApp adds (\w+) and (\w+) \(`phases`\)", SERVER_PHASES[-2:]),
    Claim(
        DOCS,
        r"\| `server-optimizer` \| moments .*?\n\|---\|---\|---\|\n((?:\| `\w+` \|.*\n)+)",
        frozenset(SERVER_OPTIMIZERS) - {"none"},
        r"(?m)^\| `(\w+)` \|",
    ),
    # CLI defaults
    Claim(DOCS, r"past `--max-shard-size`, default\s+`(\w+)`", ModelsRequest.model_fields["max_shard_size"].default),
    Claim(
        DOCS,
        r"\| `--batch-size B` \| prompts generated per batch \(default (\d+)\) \|",
        _default(eval_command, "batch_size"),
    ),
    # benchmark targets the docs report
    Claim(DOCS, r"best robust method within (\d+) points of its clean run", round(robust.TARGET_GAP * 100)),
    Claim(DOCS, r"its clean run — \*\*met\*\* for all (\w+)\s", len(robust.ATTACKS)),
    Claim(DOCS, r"Target ≤ ([\d.]+)× the compute bound", overhead.bound_target("default", DEFAULT_CLIENTS)),
    Claim(
        DOCS,
        r"(?s)--clients 256 --rounds 3 --local-steps 5[^\n]*\n(?:[^\n]*\n)*?\nTarget ≤ ([\d.]+)×",
        overhead.bound_target("default", 256),
    ),
    Claim(DOCS, r"\| fedfuse fedavg \(dense\) \| [^\n]*\n\nTarget ≤ ([\d.]+)×", overhead.TARGET_RATIO),
    Claim(DOCS, r"peak RSS flat in K and ≤ (\d)·P·4 B \+ one update", aggregate.MEMORY_BUDGET_STATES),
    Claim(DOCS, r"PASS fedfuse peak RSS flat in K \(≤ (\d)·P·4 B", aggregate.MEMORY_BUDGET_STATES),
    Claim(
        DOCS,
        r"(?s)DARE p = 0.9 bf16 ≤ ([\d.]+) bytes/param — .*? TIES d = 0.1 bf16 ≤ ([\d.]+) — "
        r".*?\nencode \+ decode ≥ (\d+) MB/s",
        (wire.TARGET_DARE_BYTES, wire.TARGET_TIES_BYTES, wire.TARGET_MBPS),
    ),
    Claim(DOCS, r"sparse TIES and Fisher ≥ ([\d.]+)× dense FedAvg's final accuracy", quality.TARGET_SPARSE_RATIO),
    Claim(DOCS, r"PASS arithmetic expert beats the base by ≥ ([\d.]+)", merge_quality_report.TARGET_EXPERT_GAIN),
    Claim(DOCS, r"best mean retention ≥ ([\d.]+)", merge_quality_report.TARGET_RETENTION),
    Claim(DOCS, r"TIES or DARE-TIES ≥ task arithmetic \+ ([\d.]+) — \*\*met", merge_quality_report.TARGET_TIES_MARGIN),
    Claim(
        DOCS,
        r"λ is picked per method and seed from a (\d+)-point grid",
        len(merge_quality_experts.SUM_GRID),
    ),
    Claim(
        DOCS,
        r"one LoRA expert per skill \(rank (\d+), α (\d+), q/k/v/o projections, (\d+) AdamW steps of (\d+) chats, "
        r"lr\s+([\d.e-]+)\)",
        tuple(_default(merge_quality, k) for k in ("lora_rank", "lora_alpha", "steps", "batch_size", "learning_rate")),
    ),
    Claim(DOCS, r"Gram matrices over (\d+) batches of its own training prompts", merge_quality_experts.GRAM_BATCHES),
    Claim(
        DOCS,
        r"best method without Gram matrices ≥ ([\d.]+) mean normalized accuracy and ≥ task arithmetic \+ ([\d.]+)",
        (merge_quality_report.TARGET_DATA_FREE_OR_SEARCHED, merge_quality_report.TARGET_OVER_ARITHMETIC),
    ),
    Claim(
        DOCS,
        r"federated coefficient learning within ([\d.]+) of the central run",
        merge_quality_report.TARGET_FEDERATED_GAP,
    ),
    Claim(DOCS, r"the test split \((\d+) prompts per skill\)", _default(merge_quality, "test_rows")),
    Claim(
        DOCS,
        r"scoring (\d+) methods × (\d+) λ",
        (len(merge_quality_experts.CANDIDATE_METHODS) + 1, len(merge_quality_experts.SUM_GRID)),
    ),
    Claim(
        DOCS,
        r"TIES trim ([\d.]+), DARE p = ([\d.]+), breadcrumbs ([\d.]+), DELLA ([\d.]+)\)",
        tuple(merge_quality_experts.DENSITIES[k] for k in ("trim", "dare", "breadcrumbs", "della")),
    ),
)


@cache
def _text(doc: str) -> str:
    return (ROOT / doc).read_text(encoding="utf-8")


def _pages(doc: str) -> list[str]:
    """The pages a claim about ``doc`` is searched in: every page for ``DOCS``, else that one."""
    if doc != DOCS:
        return [doc]
    found = [name for name in ("README.md", "CONTRIBUTING.md") if (ROOT / name).is_file()]
    return found + sorted(str(path.relative_to(ROOT)) for path in (ROOT / "docs").rglob("*.md"))


def _read(said: str) -> Any:
    """What a doc wrote, as a value: 1,000,000 → 1000000; 10¹² → 10**12; seven → 7; 1e-3 → 0.001; else the text."""
    said = said.strip()
    if said in WORDS:
        return WORDS[said]
    if said == "10¹²":
        return 10**12
    try:
        return float(said.replace(",", ""))
    except ValueError:
        return {"True": True, "False": False, "None": None}.get(said, said)


def _shaped(claim: Claim, found: re.Match[str]) -> Any:
    """The values one match states, shaped as ``claim.code``."""
    if isinstance(claim.code, frozenset):
        return frozenset(name.lower() for name in re.findall(claim.names, found.group(1)))
    values = tuple(_read(group) for group in found.groups())
    return values if isinstance(claim.code, tuple) else values[0]


def _said_everywhere(claim: Claim) -> dict[str, Any]:
    """Each page that states ``claim`` → the values it states (its first statement)."""
    said = {}
    for page in _pages(claim.doc):
        found = re.search(claim.pattern, _text(page))
        if found is not None:
            said[page] = _shaped(claim, found)
    assert said, f"no page of {claim.doc} says this any more (pattern {claim.pattern!r}): update the row"
    return said


def _said(claim: Claim) -> Any:
    """The values the doc states for ``claim`` (the first page that states it), shaped as ``claim.code``."""
    return next(iter(_said_everywhere(claim).values()))


def _id(claim: Claim) -> str:
    return f"{claim.doc}:{claim.pattern[:40]}"


@pytest.mark.parametrize("claim", CLAIMS, ids=_id)
def test_the_doc_states_the_code_value(claim: Claim) -> None:
    said = _said_everywhere(claim)
    assert said == dict.fromkeys(said, claim.code), "the docs drifted from the code"


def test_the_docs_state_the_style_gate_s_thresholds() -> None:
    ruff = tomllib.loads(_text("pyproject.toml"))["tool"]["ruff"]
    body_lines = re.search(r"MAX_BODY_LINES = (\d+)", _text("tests/test_layers.py"))
    gate = (
        r"ruff lint \+ format at (\d+) columns.*?no function body outside\s+`fedfuse/bench/` is longer than (\d+) "
        r"lines; with ruff's C901 \(complexity ≤ (\d+)\) and PLR0915 \(≤ (\d+) statements\)"
    )
    said = {page: found for page in _pages(DOCS) if (found := re.search(gate, _text(page), flags=re.DOTALL))}
    assert body_lines is not None and said, "the docs' style-gate sentence or MAX_BODY_LINES moved"
    code = (
        ruff["line-length"],
        int(body_lines.group(1)),
        ruff["lint"]["mccabe"]["max-complexity"],
        ruff["lint"]["pylint"]["max-statements"],
    )
    assert {page: tuple(map(int, found.groups())) for page, found in said.items()} == dict.fromkeys(said, code)


def test_every_quoted_fedfuse_record_or_group_the_docs_name_is_the_code_s() -> None:
    known = {
        value
        for module in (messages, mods, sparsifiers, strategy_registry, trainer_registry)
        for name, value in vars(module).items()
        if name.isupper() and isinstance(value, str)
    }
    quoted = {name for doc in _pages(DOCS) for name in re.findall(r'"(fedfuse\.[\w.-]+)"', _text(doc))}
    assert quoted and sorted(quoted - known) == []


def test_a_drifted_number_fails() -> None:
    drifted = Claim(ARCH, r"`CHUNK_BYTES` \((\d+) MiB\)", 64)
    assert _said(drifted) != drifted.code
    a_reason_added = Claim(ARCH, r"(?s)`ROUND_REASONS` \((.*?): the engine", frozenset({*ROUND_REASONS, "new_reason"}))
    assert _said(a_reason_added) != a_reason_added.code
    assert _read("1,000,000") == 1_000_000 and _read("10¹²") == MAX_NUM_EXAMPLES and _read("seven") == 7
    assert _read("1e-3") == 0.001 and _read("float32") == "float32"


def test_every_run_config_key_the_settings_table_names_is_in_that_section() -> None:
    rows = re.findall(r"(?m)^\| `settings\.(\w+)` \| `\w+` \| (.*) \|$", _text(ARCH))
    assert len(rows) == len(SECTIONS)
    misplaced = [
        (section, key)
        for section, holds in rows
        for key in re.findall(r"`([\w-]+)`", holds)
        if key in DEFAULTS and SECTION_OF[key.replace("-", "_")] != section
    ]
    assert misplaced == []


@cache
def _class_members() -> dict[str, set[str]]:
    """Every fedfuse class by name → the methods and annotated attributes its body defines."""
    members: dict[str, set[str]] = {}
    for path in (ROOT / "fedfuse").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                members.setdefault(node.name, set()).update(
                    item.name if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) else item.target.id
                    for item in node.body
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                    or (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name))
                )
    return members


def test_the_cost_model_names_only_paths_and_members_that_exist() -> None:
    text = _text(COST)
    paths = re.findall(r"(?<![\w/.-])(fedfuse/[\w/.-]*)", text)
    cited = set(re.findall(r"`([A-Z]\w+)\.(\w+)`", text))
    assert paths and cited, "the cost model cites no code: the patterns are wrong"
    assert sorted(path for path in paths if not (ROOT / path.rstrip(".")).exists()) == []
    assert sorted((cls, name) for cls, name in cited if name not in _class_members().get(cls, set())) == []

"""Coefficient search and greedy soup on a tiny chat Llama whose right answer is known.

Two candidates (tests/search_helpers.py): ``good`` lowers the validation loss, ``noise`` raises it. A search
must weight ``good`` above ``noise`` and beat the default point; a greedy soup must leave ``noise`` out; the
recipe written for the best point must make, through fedfuse's recipe merge (what ``fedfuse merge --config``
runs; the command itself is in test_automerge_search_cli.py), the model that was scored.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from search_helpers import PAIRS, good_and_noise, write_chats

from fedfuse.automerge import CoefficientModel
from fedfuse.automerge.inputs import load_inputs
from fedfuse.automerge.recipe_out import recipe_document, write_outputs
from fedfuse.automerge.scorers import (
    AccuracyScorer,
    ExactMatchScorer,
    build_scorer,
    greedy_answers,
    parse_scorer,
)
from fedfuse.automerge.search import Point, SearchSpace, load_point, search
from fedfuse.automerge.soup import greedy_soup
from fedfuse.offline.errors import MergeInputError
from fedfuse.offline.recipe import merge_recipe

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def setup(tiny_chat_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, good, noise folders and the validation chats (val)."""
    return good_and_noise(tiny_chat_llama_dir, tmp_path_factory.mktemp("search"))


def _loaded(setup: dict[str, Path], groups: int = 1):
    inputs = load_inputs(setup["base"], models=[setup["good"], setup["noise"]], layer_groups=groups)
    scorer = build_scorer(f"loss:{setup['val']}", inputs.model, inputs.tokenizer, causal=True)
    return inputs, CoefficientModel(inputs.model, inputs.candidates), scorer


@pytest.mark.parametrize("optimizer", ["cma", "tpe"])
def test_search_weights_the_helpful_candidate_and_beats_the_default(setup, optimizer):
    _, cmodel, scorer = _loaded(setup)
    result = search(
        cmodel, scorer, method="task_arithmetic", space=SearchSpace(), budget=14, optimizer=optimizer, seed=1
    )
    best = result.best
    assert len(result.evaluations) == 14 and scorer.evaluations == 14  # the budget, exactly
    assert result.baseline.point.weights == ((1.0,), (1.0,))  # the default point is scored first
    assert best.point.weights[0][0] > best.point.weights[1][0] + 0.3
    assert best.score > result.baseline.score
    assert scorer.score(cmodel) == pytest.approx(best.score)  # the best merge is left loaded


@pytest.mark.parametrize("optimizer", ["cma", "tpe"])
def test_a_given_start_point_is_the_baseline_and_the_search_never_ends_below_it(setup, optimizer):
    _, cmodel, scorer = _loaded(setup)
    start = Point(((0.4,), (0.2,)))
    space = SearchSpace()
    result = search(cmodel, scorer, method="task_arithmetic", space=space, budget=4, optimizer=optimizer, start=start)
    assert result.baseline.point == start and result.evaluations[0].point == start
    assert result.best.score >= result.baseline.score


@pytest.mark.parametrize("optimizer", ["cma", "tpe"])
def test_the_same_seed_gives_the_same_search_and_another_seed_another(setup, optimizer):
    def run(seed: int) -> list:
        _, cmodel, scorer = _loaded(setup)
        space = SearchSpace(lam=True)
        found = search(cmodel, scorer, method="ties", space=space, budget=5, optimizer=optimizer, seed=seed)
        return [(e.point, e.score) for e in found.evaluations]

    first = run(3)
    assert run(3) == first
    assert run(4)[1:] != first[1:]


def test_greedy_soup_keeps_the_helpful_candidate_and_leaves_the_noise_out(setup):
    _, cmodel, scorer = _loaded(setup)
    result = greedy_soup(cmodel, scorer)
    assert result.chosen == ("good",)
    assert len(result.evaluations) == 3 and scorer.evaluations == 3  # 2K − 1
    assert result.best.point.weights == ((1.0,), (0.0,))
    assert result.evaluations[2].score < result.evaluations[0].score  # the soup with the noise was worse


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "dare_ties"])
def test_the_recipe_written_remakes_the_scored_merge_through_fedfuse_merge_config(setup, tmp_path, method):
    inputs, cmodel, scorer = _loaded(setup, groups=2)
    space = SearchSpace.parse("weights,density" if method == "dare_ties" else "weights", method)
    result = search(cmodel, scorer, method=method, space=space, budget=4, seed=5)
    models = [setup["good"], setup["noise"]]
    out = tmp_path / "out"
    write_outputs(result, inputs, base=setup["base"], models=models, out=out, seed=5, force=False, settings={})
    doc = yaml.safe_load((out / "recipe.yaml").read_text())
    weight = doc["models"][0]["parameters"]["weight"]
    assert isinstance(weight, list) and weight[-1].keys() == {"value"}  # per layer group: filters, then a default
    scored = dict(cmodel.model.named_parameters())
    written = _tensors(out)
    for name in inputs.candidates.names:
        assert torch.allclose(written[name], scored[name], atol=1e-6), name
    merge_recipe(out / "recipe.yaml", out=tmp_path / "again", seed=5)
    remade = _tensors(tmp_path / "again")
    assert remade.keys() == written.keys() and all(torch.equal(remade[n], written[n]) for n in written)


def test_a_soup_recipe_lists_only_the_chosen_models(setup):
    inputs, _, _ = _loaded(setup)
    point = Point(((1.0,), (0.0,)))
    doc = recipe_document("linear", setup["base"], [setup["good"], setup["noise"]], point, inputs.candidates)
    assert doc == {
        "merge_method": "linear",
        "models": [{"model": str(setup["good"].resolve()), "parameters": {"weight": 1.0}}],
    }


def test_exact_match_scores_the_models_own_greedy_answers_as_right(setup, tmp_path):
    inputs, cmodel, _ = _loaded(setup)
    load_point(cmodel, "task_arithmetic", Point(((1.0,), (0.0,))), 0)
    prompts = [p for p, _ in PAIRS[:4]]
    own = greedy_answers(cmodel.model, inputs.tokenizer, prompts, 6, batch_size=3)
    right = ExactMatchScorer(inputs.tokenizer, list(zip(prompts, own, strict=True)), 6, batch_size=2)
    wrong = ExactMatchScorer(inputs.tokenizer, [(p, f"never {a}") for p, a in zip(prompts, own, strict=True)], 6)
    assert right.score(cmodel) == 1.0 and wrong.score(cmodel) == 0.0 and right.evaluations == 1
    file = write_chats(tmp_path / "em.jsonl", list(zip(prompts, own, strict=True)))
    built = build_scorer(f"exact-match:{file},max_new_tokens=6", inputs.model, inputs.tokenizer, causal=True)
    assert built.score(cmodel) == 1.0


def test_accuracy_reads_label_names_or_ids_and_counts_argmax_hits(tmp_path):
    from tiny_models import tiny_llama_config
    from transformers import LlamaForSequenceClassification

    from fedfuse.automerge.coefficients import Candidates
    from fedfuse.models.loading import load_tokenizer

    tokenizer = load_tokenizer("default")
    config = tiny_llama_config(vocab_size=len(tokenizer), num_labels=2, pad_token_id=tokenizer.pad_token_id)
    config.id2label, config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    texts = ["good film", "bad film", "fine", "awful", "great"]
    encoded = tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**encoded).logits.argmax(-1).tolist()
    names = ["neg", "pos"]
    (tmp_path / "v.csv").write_text(
        "sentence,y\n"
        + "".join(f"{t},{names[p] if i % 2 else p}\n" for i, (t, p) in enumerate(zip(texts, predicted, strict=True)))
    )
    scorer = build_scorer(
        f"accuracy:{tmp_path / 'v.csv'},text=sentence,label=y,max_length=16", model, tokenizer, causal=False
    )
    assert isinstance(scorer, AccuracyScorer)
    vector = {"score.weight": torch.zeros_like(model.score.weight)}
    cmodel = CoefficientModel(model, Candidates.build(["a"], [vector]))
    assert scorer.score(cmodel) == 1.0
    (tmp_path / "bad.csv").write_text("sentence,y\nok,maybe\n")
    with pytest.raises(MergeInputError, match="label 'maybe' is neither"):
        build_scorer(f"accuracy:{tmp_path / 'bad.csv'},text=sentence,label=y", model, tokenizer, causal=False)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bleu:val.jsonl", "KIND one of loss, exact-match, accuracy, lm-eval"),
        ("loss", "expected KIND:FILE"),
        ("loss:missing.jsonl", "no such file missing.jsonl"),
        ("loss:{val},rows=0", "rows must be a positive integer"),
        ("loss:{val},temperature=2", "unknown option 'temperature=2'"),
        ("lm-eval:fedfuse_sort,data=/no/such/dir", "data folder /no/such/dir does not exist"),
    ],
)
def test_bad_scorer_specs_are_refused_in_one_line(setup, spec, message):
    with pytest.raises(MergeInputError, match=message.replace("(", r"\(")) as caught:
        parsed = parse_scorer(spec.format(val=setup["val"]))
        parsed.number("rows", None)
    assert "\n" not in str(caught.value)


def test_search_spaces_refuse_what_the_method_lacks():
    with pytest.raises(MergeInputError, match="linear has no λ"):
        SearchSpace.parse("weights,lam", "linear")
    with pytest.raises(MergeInputError, match="task_arithmetic does not sparsify"):
        SearchSpace.parse("density", "task_arithmetic")
    with pytest.raises(MergeInputError, match="choose among weights, lam, density"):
        SearchSpace.parse("weights,alpha", "ties")
    assert SearchSpace.parse("lam, density", "dare_ties") == SearchSpace(weights=False, lam=True, density=True)


@pytest.mark.parametrize(("optimizer", "module"), [("cma", "cma"), ("tpe", "optuna")])
def test_a_missing_optimizer_package_names_the_extra_to_install(setup, monkeypatch, optimizer, module):
    import sys

    _, cmodel, scorer = _loaded(setup)
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(MergeInputError, match=r"pip install 'fedfuse\[search\]'"):
        search(cmodel, scorer, method="linear", space=SearchSpace(), budget=3, optimizer=optimizer)
    assert scorer.evaluations == 0  # refused before any evaluation

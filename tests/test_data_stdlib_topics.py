"""The standard-library topic dataset: real docstrings, labelled by module domain, deterministic, no imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedfuse.data.stdlib_topics as topics
from fedfuse.data import LABEL_NAMES, TopicDataset, load_stdlib_topics, train_test_split
from fedfuse.data.stdlib_topics import (
    DOMAIN_MODULES,
    EXCLUDED_DIRS,
    MODULE_DOMAINS,
    clean_docstring,
    domain_of,
    iter_stdlib_sources,
)

# Tiers are marked per test here: this module mixes e2e and unit tests.


@pytest.fixture(scope="module")
def dataset() -> TopicDataset:
    return load_stdlib_topics()


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# --- the built dataset -------------------------------------------------------------------------


@pytest.mark.unit
def test_has_about_six_thousand_examples_and_every_class_at_least_150(dataset: TopicDataset) -> None:
    assert 4500 <= len(dataset) <= 8000
    assert dataset.label_names == LABEL_NAMES
    counts = dataset.class_counts()
    assert list(counts) == list(LABEL_NAMES)
    assert min(counts.values()) >= 150, counts
    assert sum(counts.values()) == len(dataset)


@pytest.mark.unit
def test_fields_are_aligned_and_labels_are_ints(dataset: TopicDataset) -> None:
    assert len(dataset.texts) == len(dataset.labels) == len(dataset.sources) == len(dataset)
    assert dataset.labels.dtype == np.int64
    assert set(np.unique(dataset.labels)) == set(range(len(LABEL_NAMES)))
    assert np.array_equal(dataset.domains, dataset.labels)


@pytest.mark.unit
def test_each_load_returns_its_own_labels_array() -> None:
    first = load_stdlib_topics()
    original = first.labels.copy()
    first.labels[:] = 0
    assert np.array_equal(load_stdlib_topics().labels, original)


@pytest.mark.unit
def test_texts_are_clean_unique_one_line_prose(dataset: TopicDataset) -> None:
    assert all(30 <= len(text) <= 300 for text in dataset.texts)
    assert all("\n" not in text and text == text.strip() and "  " not in text for text in dataset.texts)
    assert not any(text.startswith(">>>") for text in dataset.texts)
    assert len({text.lower() for text in dataset.texts}) == len(dataset)


@pytest.mark.unit
def test_each_label_is_the_domain_of_its_source_module(dataset: TopicDataset) -> None:
    for label, source in zip(dataset.labels, dataset.sources, strict=False):
        assert domain_of(source) == LABEL_NAMES[label], source
    components = {part for source in dataset.sources for part in source.split(".")}
    assert not components & EXCLUDED_DIRS


@pytest.mark.unit
def test_known_docstrings_land_in_their_domain(dataset: TopicDataset) -> None:
    by_source: dict[str, set[str]] = {}
    for label, source in zip(dataset.labels, dataset.sources, strict=False):
        by_source.setdefault(source.split(".")[0], set()).add(LABEL_NAMES[label])
    assert by_source["smtplib"] == {"email"}
    assert by_source["tkinter"] == {"gui"}
    assert by_source["zipfile"] == {"archives_files"}
    assert by_source["asyncio"] == {"concurrency", "networking"}
    assert "os" not in by_source and "typing" not in by_source


@pytest.mark.e2e
def test_a_fresh_process_builds_the_same_list_without_importing_what_it_reads(dataset: TopicDataset) -> None:
    code = (
        "import json, sys\n"
        "from fedfuse.data import load_stdlib_topics\n"
        "d = load_stdlib_topics()\n"
        "print(','.join(m for m in ('tkinter', 'turtle', 'idlelib', 'smtplib', 'ftplib', 'tarfile') "
        "if m in sys.modules))\n"
        "print(json.dumps([d.texts, d.labels.tolist(), d.sources]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    imported, built = result.stdout.split("\n", 1)
    assert imported == ""
    assert json.loads(built) == [list(dataset.texts), dataset.labels.tolist(), list(dataset.sources)]


# --- cache -------------------------------------------------------------------------------------


@pytest.mark.unit
def test_cache_dir_stores_the_dataset_and_reads_it_back(tmp_path: Path, dataset: TopicDataset, monkeypatch) -> None:
    first = load_stdlib_topics(cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"
    assert json.loads(files[0].read_text())["label_names"] == list(LABEL_NAMES)

    def no_build(*_: object) -> TopicDataset:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(topics, "_build", no_build)
    second = load_stdlib_topics(cache_dir=tmp_path / "cache")
    assert second.texts == first.texts == dataset.texts
    assert np.array_equal(second.labels, dataset.labels)
    assert second.sources == dataset.sources


@pytest.mark.unit
def test_a_damaged_cache_file_is_rebuilt(tmp_path: Path, dataset: TopicDataset) -> None:
    load_stdlib_topics(cache_dir=tmp_path)
    (cache,) = tmp_path.iterdir()
    cache.write_text("{not json")
    assert load_stdlib_topics(cache_dir=tmp_path).texts == dataset.texts
    assert json.loads(cache.read_text())["texts"] == list(dataset.texts)
    assert list(tmp_path.iterdir()) == [cache]


@pytest.mark.unit
def test_an_unwritable_cache_folder_is_skipped(tmp_path: Path, dataset: TopicDataset) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert load_stdlib_topics(cache_dir=blocker / "cache").texts == dataset.texts
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.unit
def test_the_cache_key_changes_with_the_builders_source(tmp_path: Path, monkeypatch) -> None:
    before = topics._cache_file(tmp_path, 30, 300)
    changed = tmp_path / "stdlib_topics.py"
    changed.write_text(Path(topics.__file__).read_text() + "\n# changed\n")
    monkeypatch.setattr(topics, "__file__", str(changed))
    assert topics._cache_file(tmp_path, 30, 300) != before


@pytest.mark.unit
def test_runs_read_the_built_in_task_from_fedfuses_cache_folder(tmp_path: Path, monkeypatch) -> None:
    from fedfuse.training import federated_dataset

    monkeypatch.setenv("FEDFUSE_CACHE_DIR", str(tmp_path))
    federated_dataset.federated_data.cache_clear()
    try:
        federated_dataset.federated_data(0, "iid", 0.5, 2)
    finally:
        federated_dataset.federated_data.cache_clear()
    assert [path.name.split("-")[0] for path in (tmp_path / "datasets").iterdir()] == ["stdlib_topics"]


@pytest.mark.unit
def test_bad_build_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="min_chars"):
        load_stdlib_topics(min_chars=50, max_chars=40)


# --- the pieces, on a fake standard library ----------------------------------------------------


@pytest.mark.unit
def test_label_names_are_the_documented_domains_and_each_module_has_one() -> None:
    assert LABEL_NAMES == (
        "networking",
        "email",
        "concurrency",
        "gui",
        "markup",
        "numeric",
        "testing",
        "archives_files",
        "importing_packaging",
        "text_processing",
    )
    listed = [module for modules in DOMAIN_MODULES.values() for module in modules]
    assert len(listed) == len(set(listed)) == len(MODULE_DOMAINS)


@pytest.mark.unit
def test_domain_is_the_longest_dotted_prefix() -> None:
    assert domain_of("asyncio.streams") == "networking"
    assert domain_of("asyncio.tasks") == "concurrency"
    assert domain_of("asyncio") == "concurrency"
    assert domain_of("email.mime.text") == "email"
    assert domain_of("emailer") is None
    assert domain_of("os") is None


@pytest.mark.unit
def test_walk_is_sorted_skips_tests_site_packages_and_unlabelled_modules(tmp_path: Path) -> None:
    for name in [
        "socket.py",
        "email/__init__.py",
        "email/parser.py",
        "test/test_socket.py",
        "email/tests/t.py",
        "site-packages/http/__init__.py",
        "lib-dynload/ssl.py",
        "os.py",
        "README.txt",
    ]:
        write(tmp_path / name, '"""Doc."""\n')
    found = [(module, domain) for module, domain, _ in iter_stdlib_sources(tmp_path)]
    assert found == [("socket", "networking"), ("email", "email"), ("email.parser", "email")]


@pytest.mark.unit
def test_missing_standard_library_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list(iter_stdlib_sources(tmp_path / "nowhere"))


@pytest.mark.unit
def test_extract_reads_module_class_and_nested_function_docstrings_and_drops_ambiguous_ones(tmp_path: Path) -> None:
    write(
        tmp_path / "smtplib.py",
        '''"""Send mail to a server over the simple mail transfer protocol."""

class SMTP:
    """A connection to an SMTP server that delivers messages."""

    def send(self):
        """Send one message through the open connection to the server."""

        def helper():
            """Retry the delivery when the server answered with a temporary error."""

def short():
    """Too short."""

def shared():
    """This sentence appears in two modules of different domains."""
''',
    )
    write(
        tmp_path / "socket.py",
        '''def shared():
    """This sentence appears in two modules of different domains."""
''',
    )
    write(tmp_path / "ssl.py", "def broken(:\n")
    examples = topics._extract(tmp_path, 30, 300)
    assert examples == [
        ("Send mail to a server over the simple mail transfer protocol.", "email", "smtplib"),
        ("A connection to an SMTP server that delivers messages.", "email", "smtplib"),
        ("Send one message through the open connection to the server.", "email", "smtplib"),
        ("Retry the delivery when the server answered with a temporary error.", "email", "smtplib"),
    ]


@pytest.mark.unit
def test_clean_docstring_keeps_leading_prose_as_one_line() -> None:
    doc = "Open the   archive\nat PATH.\n\nArgs:\n    path: where it is.\n"
    assert clean_docstring(doc) == "Open the archive at PATH."
    assert clean_docstring("Compare two texts.\n\n>>> diff('a', 'b')\n'-a+b'") == "Compare two texts."
    assert clean_docstring("Short one.\n\nA second paragraph follows.", target_chars=20) == (
        "Short one. A second paragraph follows."
    )
    assert clean_docstring("First paragraph is long enough.\n\nSecond.", target_chars=10) == (
        "First paragraph is long enough."
    )
    assert clean_docstring("Parse the text.\nReturns:\n  a tree") == "Parse the text."


@pytest.mark.unit
def test_clean_docstring_cuts_at_a_word_boundary() -> None:
    text = clean_docstring("word " * 100, max_chars=23)
    assert text == "word word word word"
    assert len(clean_docstring("x" * 400, max_chars=50)) == 50


# --- TopicDataset and the split ----------------------------------------------------------------


@pytest.mark.unit
def test_train_test_split_is_stratified_disjoint_complete_and_seeded(dataset: TopicDataset) -> None:
    train, test = train_test_split(dataset, test_fraction=0.2, seed=0)
    assert len(train) + len(test) == len(dataset)
    assert not set(train.texts) & set(test.texts)
    assert set(train.texts) | set(test.texts) == set(dataset.texts)
    for name, total in dataset.class_counts().items():
        assert test.class_counts()[name] == round(0.2 * total)
    again_train, again_test = train_test_split(dataset, test_fraction=0.2, seed=0)
    assert again_test.texts == test.texts and again_train.texts == train.texts
    assert train_test_split(dataset, test_fraction=0.2, seed=1)[1].texts != test.texts
    position = {text: i for i, text in enumerate(dataset.texts)}
    assert [position[text] for text in test.texts] == sorted(position[text] for text in test.texts)


@pytest.mark.unit
@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_fraction_outside_the_open_unit_interval_is_refused(dataset: TopicDataset, fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(dataset, test_fraction=fraction)


@pytest.mark.unit
def test_subset_takes_examples_in_the_given_order(dataset: TopicDataset) -> None:
    part = dataset.subset([5, 2, 9])
    assert part.texts == (dataset.texts[5], dataset.texts[2], dataset.texts[9])
    assert part.labels.tolist() == [dataset.labels[5], dataset.labels[2], dataset.labels[9]]
    assert part.label_names == dataset.label_names
    with pytest.raises(IndexError, match="subset indices"):
        dataset.subset([len(dataset)])


@pytest.mark.unit
def test_topic_dataset_refuses_misaligned_fields_and_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match="same length"):
        TopicDataset(texts=("a", "b"), labels=np.array([0]), label_names=("x",), sources=("m", "m"))
    with pytest.raises(ValueError, match="labels must lie"):
        TopicDataset(texts=("a",), labels=np.array([3]), label_names=("x", "y"), sources=("m",))
    with pytest.raises(ValueError, match="integers"):
        TopicDataset(texts=("a",), labels=np.array([0.5]), label_names=("x", "y"), sources=("m",))

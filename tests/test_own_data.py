"""Institutions' own data: reading files with HF datasets, the errors users see, labels, SFT masks, local splits.

Every error a user can cause names the file and, where there is one, the row or the column.
"""

from __future__ import annotations

import hashlib
import os

import datasets
import pytest
from own_data_helpers import chat_rows, sentiment_rows, write_jsonl

from fedfuse.data.files import DataError, file_sha256, read_table
from fedfuse.models import load_tokenizer
from fedfuse.settings import RunSettings, SettingsError
from fedfuse.training.client_datasets import (
    NodeData,
    load_client_datasets,
    preflight,
    run_label_names,
)
from fedfuse.training.tasks import IGNORE, tokenize_rows

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def chat_model(tiny_chat_llama_dir):
    return tiny_chat_llama_dir


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_tokenizer("default")


def test_jsonl_csv_parquet_and_save_to_disk_read_the_same_rows(tmp_path):
    rows = sentiment_rows(12)
    table = datasets.Dataset.from_list(rows)
    write_jsonl(tmp_path / "a.jsonl", rows)
    table.to_csv(str(tmp_path / "a.csv"), index=False)
    table.to_parquet(str(tmp_path / "a.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "saved-dict"))
    for name in ("a.jsonl", "a.csv", "a.parquet", "saved", "saved-dict"):
        read = read_table(tmp_path / name)
        assert read["text"] == table["text"] and read["label"] == table["label"], name


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "data file .*missing.jsonl does not exist"),
        ("notes.txt", "hello", r"notes.txt: unknown data format '\.txt'; expected a .jsonl/.json, .csv or .parquet"),
        ("broken.jsonl", '{"text": "a", "label": "x"}\n{"text": "b",\n', r"broken.jsonl line 2: not valid JSON"),
        ("list.jsonl", '{"text": "a"}\n[1, 2]\n', r"list.jsonl line 2: each line must be a JSON object"),
        ("empty.csv", "text,label\n", r"empty.csv holds no rows"),
    ],
)
def test_unreadable_files_are_refused_naming_the_file_and_line(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        read_table(tmp_path / name)


def test_a_plain_folder_and_a_multi_split_folder_are_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="is a folder but not a datasets save_to_disk folder"):
        read_table(tmp_path / "plain")
    table = datasets.Dataset.from_list(sentiment_rows(4))
    datasets.DatasetDict({"a": table, "b": table}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match="holds splits a, b"):
        read_table(tmp_path / "two")


def test_a_missing_column_is_named_with_the_columns_the_file_has(tmp_path, minilm_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "hi", "label": "x"}])
    settings = RunSettings.from_run_config(task="classify", data=str(path), labels="x")
    with pytest.raises(DataError, match=r"d.jsonl: no column 'text' .*its columns are sentence, label"):
        tokenize_rows(read_table(path), minilm_tokenizer, settings, label_names=("x",), source=str(path))


def test_the_label_set_comes_from_run_config_or_is_read_once_from_the_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(6))
    assert run_label_names(RunSettings.from_run_config(task="classify", data=str(path))) == ("negative", "positive")
    assert run_label_names(
        RunSettings.from_run_config(task="classify", data=str(path), labels="positive,negative,neutral")
    ) == (
        "positive",
        "negative",
        "neutral",
    )
    numeric = write_jsonl(tmp_path / "n.jsonl", [{"text": "a", "label": 10}, {"text": "b", "label": 2}])
    assert run_label_names(RunSettings.from_run_config(task="classify", data=str(numeric))) == ("2", "10")


def test_nodes_with_only_their_own_files_need_the_label_set_in_run_config():
    with pytest.raises(DataError, match="task 'classify' needs its label set: set run config labels"):
        run_label_names(RunSettings.from_run_config(task="classify"))


def test_a_client_with_a_label_outside_the_run_label_set_is_refused_with_its_row(tmp_path, minilm_tokenizer):
    path = write_jsonl(tmp_path / "site.jsonl", [*sentiment_rows(4), {"text": "meh", "label": "neutral"}])
    settings = RunSettings.from_run_config(
        task="classify", labels="negative,positive", client_eval_examples=0, validation_fraction=0.0
    )
    with pytest.raises(
        DataError,
        match=r"site.jsonl row 4: label 'neutral' in column 'label' "
        r"is not one of the run's labels \(negative, positive\)",
    ):
        load_client_datasets(settings, minilm_tokenizer, partition_id=0, num_partitions=1, node=NodeData(str(path)))


def test_sft_labels_cover_exactly_the_assistant_turns(tmp_path, chat_model):
    tokenizer = load_tokenizer(str(chat_model))
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is two plus one"},
            {"role": "assistant", "content": "it is three"},
            {"role": "user", "content": "and four plus one"},
            {"role": "assistant", "content": "it is five"},
        ]
    }
    settings = RunSettings.from_run_config(task="sft", data="x.jsonl", model=str(chat_model), max_length=64)
    tokens = tokenize_rows(datasets.Dataset.from_list([row]), tokenizer, settings, label_names=(), source="x.jsonl")
    labels = tokens.labels[0]
    learned = tokenizer.decode(labels[labels != IGNORE])
    assert learned == "it is three [SEP] it is five [SEP]"
    prompt_ids = tokens.input_ids[0][(labels == IGNORE) & (tokens.attention_mask[0] == 1)]
    assert "be brief" in tokenizer.decode(prompt_ids) and "what is two plus one" in tokenizer.decode(prompt_ids)
    assert bool((labels[tokens.attention_mask[0] == 0] == IGNORE).all()), "padding carries no loss"


def test_prompt_response_columns_are_the_same_as_a_user_assistant_conversation(chat_model):
    tokenizer = load_tokenizer(str(chat_model))
    settings = RunSettings.from_run_config(task="sft", data="x.jsonl", model=str(chat_model), max_length=32)
    as_messages = tokenize_rows(
        datasets.Dataset.from_list(chat_rows(3)), tokenizer, settings, label_names=(), source="m"
    )
    pairs = [{"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]} for r in chat_rows(3)]
    as_pairs = tokenize_rows(datasets.Dataset.from_list(pairs), tokenizer, settings, label_names=(), source="p")
    assert as_messages.input_ids.equal(as_pairs.input_ids) and as_messages.labels.equal(as_pairs.labels)


def test_sft_input_errors_name_the_row_or_what_is_missing(chat_model, minilm_tokenizer):
    tokenizer = load_tokenizer(str(chat_model))
    settings = RunSettings.from_run_config(task="sft", data="chat.jsonl", model=str(chat_model), max_length=32)
    no_answer = [{"messages": [{"role": "user", "content": "hello"}]}]
    with pytest.raises(DataError, match=r"chat.jsonl row 0: no assistant message"):
        tokenize_rows(datasets.Dataset.from_list(no_answer), tokenizer, settings, label_names=(), source="chat.jsonl")
    bad_role = [{"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}]}]
    with pytest.raises(DataError, match=r"chat.jsonl row 0: every message needs a role"):
        tokenize_rows(datasets.Dataset.from_list(bad_role), tokenizer, settings, label_names=(), source="chat.jsonl")
    wrong_columns = datasets.Dataset.from_list([{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"needs a 'messages' column .* or 'prompt' and 'response' columns"):
        tokenize_rows(wrong_columns, tokenizer, settings, label_names=(), source="chat.jsonl")
    short = settings.replace(max_length=4)
    with pytest.raises(DataError, match="max-length 4 cuts off every assistant answer"):
        tokenize_rows(datasets.Dataset.from_list(chat_rows(2)), tokenizer, short, label_names=(), source="chat.jsonl")
    with pytest.raises(DataError, match="has none"):
        tokenize_rows(datasets.Dataset.from_list(chat_rows(2)), minilm_tokenizer, settings, label_names=(), source="c")


def test_a_node_holds_out_a_seeded_validation_split_or_uses_its_own_eval_file(tmp_path, minilm_tokenizer):
    path = write_jsonl(tmp_path / "site.jsonl", sentiment_rows(40))
    settings = RunSettings.from_run_config(task="classify", labels="negative,positive", validation_fraction=0.25)
    node = NodeData(str(path))
    first = load_client_datasets(settings, minilm_tokenizer, partition_id=0, num_partitions=1, node=node)
    again = load_client_datasets(settings, minilm_tokenizer, partition_id=0, num_partitions=1, node=node)
    assert (len(first.train_rows), len(first.eval_rows)) == (30, 10)
    assert first.eval_rows["text"] == again.eval_rows["text"], "the split is seeded"
    assert not set(first.train_rows["text"]) & set(first.eval_rows["text"])
    assert first.source.rows == 40 and first.source.sha256 == file_sha256(str(path))
    held_out = write_jsonl(tmp_path / "held-out.jsonl", sentiment_rows(6))
    own = load_client_datasets(
        settings, minilm_tokenizer, partition_id=0, num_partitions=1, node=NodeData(str(path), str(held_out))
    )
    assert (len(own.train_rows), len(own.eval_rows)) == (40, 6)


def test_a_share_is_tokenized_once_per_process_until_its_file_changes(tmp_path, minilm_tokenizer):
    path = write_jsonl(tmp_path / "site.jsonl", sentiment_rows(12))
    settings = RunSettings.from_run_config(task="classify", labels="negative,positive", validation_fraction=0.25)
    node = NodeData(str(path))
    first = load_client_datasets(settings, minilm_tokenizer, partition_id=0, num_partitions=1, node=node)
    assert load_client_datasets(settings, minilm_tokenizer, partition_id=0, num_partitions=1, node=node) is first
    other = load_client_datasets(settings, minilm_tokenizer, partition_id=0, num_partitions=2, node=node)
    assert other is not first
    write_jsonl(path, sentiment_rows(20))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    edited = load_client_datasets(settings, minilm_tokenizer, partition_id=0, num_partitions=1, node=node)
    assert edited is not first and edited.source.rows == 20


def test_the_built_in_task_is_not_loaded_when_a_node_has_its_own_file(tmp_path, minilm_tokenizer, monkeypatch):
    from fedfuse.training import client_datasets

    def forbidden(*args, **kwargs):
        raise AssertionError("the built-in task was loaded")

    monkeypatch.setattr(client_datasets, "data_for", forbidden)
    path = write_jsonl(tmp_path / "site.jsonl", sentiment_rows(10))
    settings = RunSettings.from_run_config(task="classify", labels="negative,positive")
    data = load_client_datasets(settings, minilm_tokenizer, partition_id=0, num_partitions=2, node=NodeData(str(path)))
    assert data.source.path == str(path) and data.label_names == ("negative", "positive")


def test_own_data_tasks_without_any_data_and_topics_with_data_are_refused(tmp_path, minilm_tokenizer):
    with pytest.raises(DataError, match="task 'classify' trains on your data"):
        load_client_datasets(
            RunSettings.from_run_config(task="classify", labels="a,b"),
            minilm_tokenizer,
            partition_id=0,
            num_partitions=1,
        )
    with pytest.raises(SettingsError, match="task 'topics' is the built-in docstring task"):
        RunSettings.from_run_config(task="topics", data="x.jsonl")
    with pytest.raises(DataError, match="task 'sft' trains on your data: give --data FILE or --data-dir DIR"):
        preflight(RunSettings.from_run_config(task="sft"), 2)


def test_preflight_checks_every_share_before_a_simulation_starts(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(12, institutions=3))
    preflight(
        RunSettings.from_run_config(
            task="classify", data=str(path), partition="natural", partition_column="institution"
        ),
        3,
    )
    with pytest.raises(DataError, match="institution"):
        preflight(
            RunSettings.from_run_config(
                task="classify", data=str(path), partition="natural", partition_column="institution"
            ),
            4,
        )


def test_a_files_digest_follows_an_edit_in_the_same_process(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a", "label": 0}\n')
    before = file_sha256(str(path))
    path.write_text('{"text": "b", "label": 1}\n{"text": "c", "label": 0}\n')
    assert file_sha256(str(path)) != before == hashlib.sha256(b'{"text": "a", "label": 0}\n').hexdigest()

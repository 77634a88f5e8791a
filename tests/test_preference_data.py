"""Preference / SFT data: the formats users have (JSONL, Parquet, a saved datasets folder), splits, and every
validation error naming its row, or dropped and counted under skip_invalid."""
import json
import re
from dataclasses import replace

import pytest

from rlhf_fast.errors import UserError
from rlhf_fast.preference_data import load_examples, parse_conversation, parse_preference, read_splits
from rlhf_fast.trainers.stage import StageDataConfig


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def cfg(path, **kw):
    return replace(StageDataConfig(train_file=str(path), eval_fraction=0.0), **kw)


GOOD = {"prompt": "Hi?", "chosen": "Hello there!", "rejected": "Go away."}


def test_pairwise_strings_and_chat_lists():
    p = parse_preference(GOOD, "d", 1)
    assert p.prompt == [{"role": "user", "content": "Hi?"}] and p.responses == ["Hello there!", "Go away."]
    assert p.strict == [True] and not p.rated and p.prompt_text == "Hi?"
    # TRL "implicit prompt": whole conversations that share all but the last (assistant) message
    conv = {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No."}]}
    q = parse_preference(conv, "d", 2)
    assert q.prompt == [{"role": "user", "content": "Hi?"}] and q.responses == ["Hello!", "No."]
    # explicit prompt messages, responses as one-message lists; scores and margin carried
    r = parse_preference({"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
                          "chosen": [{"role": "assistant", "content": "Hey!"}], "rejected": [{"role": "assistant", "content": "Meh."}],
                          "score_chosen": 0.9, "score_rejected": 0.1, "margin": 0.5, "objective": "helpful"}, "d", 3)
    assert r.responses == ["Hey!", "Meh."] and r.ratings == [0.9, 0.1] and r.rated and r.margin == 0.5 and r.objective == "helpful"


def test_ranked_rows_are_ordered_best_first():
    row = {"prompt": "Q", "responses": ["b", "c", "a"], "ranking": [2, 3, 1]}
    p = parse_preference(row, "d", 1)
    assert p.responses == ["a", "b", "c"] and p.strict == [True, True] and p.ratings == [-1.0, -2.0, -3.0]
    zero_based = parse_preference(dict(row, ranking=[1, 2, 0]), "d", 1)
    assert zero_based.responses == ["a", "b", "c"]
    s = parse_preference({"prompt": "Q", "responses": ["x", "y", "z", "w"], "scores": [1, 3, 3, 0.5]}, "d", 1)
    assert s.responses[2:] == ["x", "w"] and set(s.responses[:2]) == {"y", "z"}
    assert s.strict == [False, True, True] and s.rated and s.ratings == [3, 3, 1, 0.5]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q", "chosen": "a"}, "row 7: missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "row 7: missing field 'prompt'"),
    ({"prompt": "Q", "chosen": "  ", "rejected": "b"}, "row 7: field 'chosen' is an empty string"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "row 7: field 'prompt' is an empty string"),
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "row 7: tie"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": 1, "score_rejected": 1}, "row 7: tie"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": 0, "score_rejected": 1}, "row 7: score_chosen"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "margin": -1}, "row 7: margin must be >= 0"),
    ({"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [1, 1, 2]}, "row 7: 'ranking' [1, 1, 2] is not a permutation"),
    ({"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [1, 2]}, "row 7: 'ranking' [1, 2] is not a permutation"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranking": [1, 3]}, "row 7: 'ranking' [1, 3] is not a permutation"),
    ({"prompt": "Q", "responses": ["a", "b"], "scores": [2, 2]}, "row 7: tie"),
    ({"prompt": "Q", "responses": ["a", "b"]}, "row 7: missing field 'scores'"),
    ({"prompt": "Q", "responses": ["a"], "ranking": [1]}, "row 7: 'responses' must be a list of at least 2"),
    ({"prompt": "Q", "responses": ["a", "a"], "ranking": [1, 2]}, "row 7: 'responses' holds the same response twice"),
    ({"prompt": "Q", "chosen": 3, "rejected": "b"}, "row 7: field 'chosen' must be a string"),
    ({"prompt": "Q", "chosen": [{"role": "user"}], "rejected": "b"}, "row 7: chosen[0] must be a {role, content} message"),
    ([1, 2], "row 7: expected an object"),
])
def test_each_invalid_row_names_its_row(row, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_preference(row, "data.train_file", 7)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q"}, "row 3: missing field 'response'"),
    ({"response": "A"}, "row 3: missing field 'prompt'"),
    ({"prompt": "Q", "response": ""}, "row 3: field 'response' is an empty string"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "row 3: 'messages' holds no assistant message"),
])
def test_sft_row_errors(row, message):
    with pytest.raises(UserError, match=message):
        parse_conversation(row, "data.train_file", 3)


def test_sft_rows():
    c = parse_conversation({"prompt": "Q", "completion": "A"}, "d", 1)
    assert c.messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"}]
    assert parse_conversation({"messages": msgs}, "d", 1).messages == msgs


def test_jsonl_error_names_the_line_and_skip_invalid_counts(tmp_path):
    rows = [GOOD, GOOD | {"chosen": "Hey!"}, "", {"prompt": "Q", "chosen": "x", "rejected": "x"}, GOOD | {"rejected": "Bye."}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(UserError, match="data.train_file row 4: tie"):  # line 3 is blank: row numbers are line numbers
        load_examples(cfg(path), "preference")
    loaded = load_examples(cfg(path, skip_invalid=True), "preference")
    assert len(loaded.train) == 3 and loaded.skipped == 1 and "row 4" in loaded.first_error
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "{not json"])
    with pytest.raises(UserError, match="row 2: not valid JSON"):
        load_examples(cfg(bad), "preference")


def test_parquet_and_saved_datasets_folder(tmp_path):
    import datasets

    rows = [GOOD | {"chosen": f"Hello {i}!"} for i in range(10)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    loaded = load_examples(cfg(tmp_path / "p.parquet", eval_fraction=0.2), "preference")
    assert len(loaded.train) == 8 and len(loaded.eval) == 2
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "saved"))
    loaded = load_examples(cfg(tmp_path / "saved"), "preference")
    assert len(loaded.train) == 10 and len(loaded.eval) == 3
    assert set(read_splits(str(tmp_path / "saved"), "d")) == {"train", "test"}
    # a bad row inside Parquet is named too
    datasets.Dataset.from_list(rows[:2] + [GOOD | {"rejected": "Hello there!"}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(UserError, match="row 3: tie"):
        load_examples(cfg(tmp_path / "bad.parquet"), "preference")


def test_splits_from_column_eval_file_and_fraction(tmp_path):
    rows = [GOOD | {"chosen": f"Hi {i}", "split": "eval" if i < 3 else "train"} for i in range(10)]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    loaded = load_examples(cfg(path), "preference")
    assert (len(loaded.train), len(loaded.eval)) == (7, 3)
    other = write_jsonl(tmp_path / "e.jsonl", [GOOD])
    loaded = load_examples(cfg(path, eval_file=other), "preference")
    assert (len(loaded.train), len(loaded.eval)) == (10, 1)
    plain = write_jsonl(tmp_path / "plain.jsonl", [GOOD | {"chosen": f"Hi {i}"} for i in range(10)])
    a = load_examples(cfg(plain, eval_fraction=0.3), "preference", seed=1)
    b = load_examples(cfg(plain, eval_fraction=0.3), "preference", seed=1)
    assert len(a.eval) == 3 and [p.responses for p in a.eval] == [p.responses for p in b.eval]


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(UserError, match="data.train_file: no training data"):
        load_examples(cfg(""), "preference")
    with pytest.raises(UserError, match="not found"):
        load_examples(cfg(tmp_path / "nope.jsonl"), "preference")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="should be a .jsonl/.json or .parquet"):
        load_examples(cfg(tmp_path / "x.csv"), "preference")
    only_bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "chosen": "x", "rejected": "x"}])
    with pytest.raises(UserError, match="no valid training rows .*row 1: tie"):
        load_examples(cfg(only_bad, skip_invalid=True), "preference")

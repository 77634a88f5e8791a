"""Prompt files: JSONL / Parquet, `prompt` or chat `messages`, splits, chat template, resumable sampler."""
import json

import pytest
from ppo_tiny import make_tiny_models

from rlhf_fast.config import DataConfig
from rlhf_fast.data import PromptSampler, left_pad, load_prompts
from rlhf_fast.errors import UserError
from rlhf_fast.models import load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tiny_models(tmp_path_factory.mktemp("tiny"))["policy"])


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_builtin_prompts_have_a_held_out_split(tok):
    ps = load_prompts(DataConfig(), tok, 48, 2048)
    assert len(ps.train) >= 200 and len(ps.eval) >= 50
    assert not {p.text for p in ps.train} & {p.text for p in ps.eval}


def test_messages_and_chat_template(tok, tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                          {"role": "assistant", "content": "dropped: the answer to learn"}]},
            {"prompt": "Plain prompt", "split": "eval"}]
    ps = load_prompts(DataConfig(prompt_file=_jsonl(tmp_path / "p.jsonl", rows)), tok, 8, 256)
    (p,), (e,) = ps.train, ps.eval
    assert p.text == "Hi there" and e.text == "Plain prompt"
    assert tok.decode(p.ids) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


def test_system_prompt_and_no_template(tok, tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    ps = load_prompts(DataConfig(prompt_file=path, system_prompt="Be kind.", eval_fraction=0.0), tok, 8, 256)
    assert tok.decode(ps.train[0].ids).startswith("<|im_start|>system\nBe kind.")
    raw = load_prompts(DataConfig(prompt_file=path, chat_template=False, eval_fraction=0.0), tok, 8, 256)
    assert tok.decode(raw.train[0].ids) == "Hello"


def test_parquet_and_fraction_split(tok, tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"prompt": f"question number {i}"} for i in range(20)]).to_parquet(str(tmp_path / "p.parquet"))
    ps = load_prompts(DataConfig(prompt_file=str(tmp_path / "p.parquet"), eval_fraction=0.25), tok, 8, 256)
    assert len(ps.eval) == 5 and len(ps.train) == 15


def test_long_prompts_dropped_on_request(tok, tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "word " * 100}, {"prompt": "short"}])
    ps = load_prompts(DataConfig(prompt_file=path, max_prompt_length=32, drop_long_prompts=True, eval_fraction=0.0), tok, 8, 256)
    assert [p.text for p in ps.train] == ["short"]
    with pytest.raises(UserError, match="longer than data.max_prompt_length=32"):
        load_prompts(DataConfig(prompt_file=path, max_prompt_length=32), tok, 8, 256)


def test_not_jsonl(tok, tmp_path):
    (tmp_path / "p.jsonl").write_text("prompt,split\nhello,train\n")
    with pytest.raises(UserError, match="line 1 is not JSON"):
        load_prompts(DataConfig(prompt_file=str(tmp_path / "p.jsonl")), tok, 8, 256)


def test_sampler_covers_epochs_and_resumes():
    s = PromptSampler(10, 4, seed=3)
    first = [s.next_batch() for _ in range(5)]  # 20 draws = 2 epochs
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    s2 = PromptSampler(10, 4, seed=3)
    s2.next_batch()
    state = s2.state_dict()
    s3 = PromptSampler(10, 4, seed=3)
    s3.load_state_dict(state)
    assert [s3.next_batch() for _ in range(4)] == first[1:]


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]

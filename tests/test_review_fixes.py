"""Review fixes: the PPO reward model scores the whole conversation exactly as `rlhf-fast rm` renders it; the
sequence score lands on the last valid token of a holed mask; truncated sampling (top-p / top-k) is refused; the
DPO reference log-prob cache is keyed on the weights, not the path."""
import json
import random
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from ppo_tiny import letter_reward, make_tiny_models, tiny_config

from rlhf_fast.config import RewardSource, load_config
from rlhf_fast.errors import UserError
from rlhf_fast.ops import reference
from rlhf_fast.rewards import CombinedReward, RewardModel
from rlhf_fast.rollout import token_rewards

CPU = torch.device("cpu")
CONV = [dict(role="system", content="You are a grumpy pirate. Answer in pirate speak."),
        dict(role="user", content="hi"), dict(role="assistant", content="hello there"),
        dict(role="user", content="Tell me about rain.")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny"))


def hf_score(path: str, ids: list[int]) -> float:
    """The saved classifier run by plain transformers on one unpadded sequence (independent of our code)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


# ----------------------------------------------------------------------------------------------- 1. RM sees the chat


def test_reward_model_scores_the_whole_conversation_as_rm_training_renders_it(tiny):
    from transformers import AutoTokenizer

    from rlhf_fast.preference_data import parse_preference
    from rlhf_fast.trainers.rm import RewardScorer, encode_preferences
    from rlhf_fast.trainers.stage import StageDataConfig

    rm = RewardModel(tiny["rm"], CPU)
    responses = ["Rain is calm and lovely on a quiet day.", "Arr."]
    convs = [CONV, [dict(role="user", content="Tell me about rain.")]]
    got = rm(["Tell me about rain."] * 2, responses, messages=convs)  # one padded batch of two lengths
    alone = [rm(["Tell me about rain."], [r])[0] for r in responses]  # the last user message only (the old input), unpadded
    assert abs(got[0] - alone[0]) > 1e-3  # the system prompt and earlier turns change the score
    assert got[1] == pytest.approx(alone[1], rel=1e-5, abs=1e-6)  # a single-turn chat is that user message (padding inert)

    # what `rlhf-fast rm` trains and evaluates on: the preference row -> encode_preferences -> RewardScorer
    row = {"prompt": CONV, "chosen": responses[0], "rejected": "Go away."}
    (ranked,), dropped = encode_preferences([parse_preference(row, "t", 1)], rm.tokenizer, StageDataConfig(max_length=1024),
                                            {"reward": 0}, "t")
    assert dropped == 0
    trained_on = RewardScorer(tiny["rm"], CPU).scores([ranked])[0][0][0]
    assert got[0] == pytest.approx(float(trained_on), rel=1e-5, abs=1e-6)
    # and both equal the chat template rendered by hand and scored by plain transformers
    tok = AutoTokenizer.from_pretrained(tiny["rm"])
    text = tok.apply_chat_template(CONV + [dict(role="assistant", content=responses[0])], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a grumpy pirate.")
    ids = tok(text, add_special_tokens=False).input_ids
    assert ranked.ids[0] == ids
    assert got[0] == pytest.approx(hf_score(tiny["rm"], ids), rel=1e-5, abs=1e-6)


def test_combined_reward_gives_the_chat_only_to_rewards_that_take_it(tiny, monkeypatch):
    seen = {}
    mod = types.ModuleType("review_conv_rewards")

    def chat_len(prompts, responses, messages):
        seen["args"] = (prompts, responses, messages)
        return [float(len(m)) for m in messages]

    mod.chat_len = chat_len
    monkeypatch.setitem(sys.modules, "review_conv_rewards", mod)
    comb = CombinedReward([RewardSource("review_conv_rewards:chat_len", 1.0), RewardSource("ppo_tiny:letter_reward", 2.0),
                           RewardSource(tiny["rm"], 0.5)], CPU)
    prompts, responses = ["Tell me about rain.", "hey"], ["wet and grey", "hello hello"]
    convs = [CONV, [dict(role="user", content="hey")]]
    total, terms = comb(prompts, responses, convs)
    assert seen["args"] == (prompts, responses, convs)
    want_rm = RewardModel(tiny["rm"], CPU)(prompts, responses, messages=convs)
    torch.testing.assert_close(terms["review_conv_rewards.chat_len"], torch.tensor([4.0, 1.0]))
    torch.testing.assert_close(terms["ppo_tiny.letter_reward"], torch.tensor(letter_reward(prompts, responses)))  # (prompts, responses)
    torch.testing.assert_close(terms["rm"], torch.tensor(want_rm))
    torch.testing.assert_close(total, torch.tensor([4.0, 1.0]) + 2 * torch.tensor(letter_reward(prompts, responses))
                               + 0.5 * torch.tensor(want_rm))
    # without messages (older callers), a chat-taking reward sees each prompt as a single user message
    comb(prompts, responses)
    assert seen["args"][2] == [[dict(role="user", content=p)] for p in prompts]
    with pytest.raises(ValueError, match="messages"):
        comb(prompts, responses, convs[:1])


def test_ppo_passes_each_prompt_chat_with_its_system_prompt_to_the_rewards(tiny, tmp_path, monkeypatch):
    from rlhf_fast.trainers.ppo import RLTrainer

    calls = []
    mod = types.ModuleType("review_ppo_rewards")

    def record(prompts, responses, messages):
        calls.append((list(prompts), [list(m) for m in messages]))
        return [0.0] * len(responses)

    mod.record = record
    monkeypatch.setitem(sys.modules, "review_ppo_rewards", mod)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [dict(role="user", content=f"first {i}"), dict(role="assistant", content="ok"),
                                                        dict(role="user", content=f"tell me about {i}")]}) + "\n" for i in range(8)))
    cfg = tiny_config(tiny["policy"], tmp_path / "run", **{"ppo.iterations": 1, "data.eval_fraction": 0.0, "data.prompt_file": str(prompts),
                                                            "data.system_prompt": "Be brief.",
                                                            "reward.sources": [{"spec": "review_ppo_rewards:record"}]})
    RLTrainer(cfg).train()
    assert calls
    for texts, chats in calls:
        assert len(texts) == len(chats) == 8
        for text, chat in zip(texts, chats):
            i = text.removeprefix("tell me about ")
            assert chat == [dict(role="system", content="Be brief."), dict(role="user", content=f"first {i}"),
                            dict(role="assistant", content="ok"), dict(role="user", content=text)]


# ----------------------------------------------------------------------------------------------- 2. holed masks


def test_token_rewards_put_the_score_on_the_last_valid_token_of_a_holed_mask():
    mask = torch.tensor([[True, False, True, False, False],  # hole at 1: last valid is 2 (sum - 1 would be 1)
                         [False, True, True, False, True],  # last valid 4
                         [False, False, False, False, False],  # no response token: no reward, score dropped
                         [True, True, True, True, True]])
    kl = torch.tensor([[0.1, 9.0, 0.3, 9.0, 9.0], [9.0, 0.2, -0.4, 9.0, 0.6], [9.0] * 5, [0.1, 0.2, 0.3, 0.4, 0.5]])
    scores = torch.tensor([1.0, -2.0, float("nan"), 3.0])
    r = token_rewards(scores, kl, mask, kl_coef=0.5)
    want = torch.tensor([[-0.05, 0.0, -0.15 + 1.0, 0.0, 0.0],
                         [0.0, -0.1, 0.2, 0.0, -0.3 - 2.0],
                         [0.0, 0.0, 0.0, 0.0, 0.0],
                         [-0.05, -0.1, -0.15, -0.2, -0.25 + 3.0]])
    torch.testing.assert_close(r, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="scores"):
        token_rewards(scores[:3], kl, mask, 0.5)
    with pytest.raises(ValueError, match="response_mask"):
        token_rewards(scores, kl, mask.long(), 0.5)


# ----------------------------------------------------------------------------------------------- 3. sampling


@pytest.mark.parametrize("over, match", [
    ({"generation.top_p": 0.9}, r"generation\.top_p=0\.9: nucleus sampling is not supported.*full softmax.*off-policy"),
    ({"generation.top_k": 50}, r"generation\.top_k=50: top-k sampling is not supported.*full softmax.*off-policy"),
    ({"generation.top_k": -1}, r"generation\.top_k: must be >= 0 \(0: off\), got -1"),
    ({"generation.top_p": 0.0}, r"generation\.top_p: must be in \(0, 1\]"),
])
def test_truncated_sampling_is_refused(over, match):
    with pytest.raises(UserError, match=match):
        load_config(None, over)


def test_full_softmax_sampling_configs_stay_valid():
    cfg = load_config(None, {"generation.top_p": 1.0, "generation.top_k": 0})
    assert cfg.generation.top_p == 1.0 and cfg.generation.top_k == 0
    root = Path(__file__).resolve().parents[1] / "configs"
    load_config(root / "ppo_smollm2_sentiment.yaml")
    from rlhf_fast.pipeline import PipelineConfig
    from rlhf_fast.trainers.stage import load_stage_config

    load_stage_config(PipelineConfig, root / "pipeline_smollm2.yaml")
    with pytest.raises(UserError, match="top_k=40"):
        load_stage_config(PipelineConfig, root / "pipeline_smollm2.yaml", {"ppo.generation.top_k": 40})


# ----------------------------------------------------------------------------------------------- 5. DPO cache key


def test_dpo_reference_cache_is_keyed_on_the_weights_not_the_path(tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from rlhf_fast.models import backbone, hidden_states, lm_head
    from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
    from rlhf_fast.trainers.stage import load_stage_config

    policy = tmp_path / "policy"
    shutil.copytree(tiny["policy"], policy)
    rng = random.Random(0)
    words = "good bad happy sad cat dog sun rain".split()
    rows = [{"prompt": f"Tell me about the {rng.choice(words)} {i}.", "chosen": "good happy sun", "rejected": "sad rain"}
            for i in range(6)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = {"model.policy": str(policy), "output_dir": str(tmp_path / "dpo"), "threads": 1, "progress_bar": False,
            "train.batch_size": 2, "train.micro_batch_size": 2, "data.train_file": str(pairs), "data.eval_fraction": 0.0,
            "save_final_model": False}
    calls = []
    original = DPOTrainer.sequence_logprobs
    monkeypatch.setattr(DPOTrainer, "sequence_logprobs", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    cache_file = tmp_path / "dpo" / "reference_logprobs.pt"

    DPOTrainer(load_stage_config(DPOConfig, None, over))
    first = torch.load(cache_file, weights_only=True)
    assert calls
    calls.clear()
    again = DPOTrainer(load_stage_config(DPOConfig, None, over))  # unchanged weights: the cache is reused
    assert not calls and again.train_set[0].ref_chosen == first["train"][0, 0].item()

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(policy)  # new weights, same path
    new = DPOTrainer(load_stage_config(DPOConfig, None, over))
    assert calls  # recomputed, not served from the stale cache
    second = torch.load(cache_file, weights_only=True)
    assert second["key"] != first["key"] and (second["train"] - first["train"]).abs().min() > 1e-3
    # they are the new weights' sequence log-probs (full-logits float64 reference op)
    p = new.train_set[0]
    ids = torch.tensor([p.chosen_ids])
    with torch.no_grad():
        h = hidden_states(backbone(model), ids, torch.ones_like(ids))
        lp = reference.linear_logprobs(h[:, :-1].double(), lm_head(model)[0].double(), torch.tensor([p.chosen_labels])[:, 1:])
    assert p.ref_chosen == pytest.approx(lp.sum().item(), rel=1e-5)


def test_weights_digest_reads_the_bytes(tiny, tmp_path):
    from rlhf_fast.trainers.dpo import weights_digest

    shutil.copytree(tiny["policy"], tmp_path / "copy")
    assert weights_digest(tmp_path / "copy") == weights_digest(tiny["policy"])  # the same bytes elsewhere: the same key
    tmp_path = tmp_path / "fake"
    tmp_path.mkdir()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no weight files"):
        weights_digest(tmp_path)
    w = tmp_path / "model.safetensors"
    w.write_bytes(b"\x00" * 100)
    a = weights_digest(tmp_path, chunk_bytes=7)
    assert a == weights_digest(tmp_path)  # chunking does not change it
    w.write_bytes(b"\x00" * 99 + b"\x01")  # same name and size, one byte differs
    assert weights_digest(tmp_path) != a
    (tmp_path / "tokenizer.json").write_text("changes nothing the weights compute")
    w.write_bytes(b"\x00" * 100)
    assert weights_digest(tmp_path) == a

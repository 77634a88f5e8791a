"""Rewards from text: VADER, module:function, a reward model that re-tokenizes, weighted sums."""
import pytest
import torch
from ppo_tiny import letter_reward, make_tiny_models

from rlhf_fast.config import RewardSource
from rlhf_fast.errors import UserError
from rlhf_fast.rewards import CombinedReward, RewardModel, load_reward

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny"))


def test_vader_sign_and_range():
    fn = load_reward("vader", CPU)
    good, bad, flat = fn(["q"] * 3, ["What a wonderful, happy day, I love it!", "This is awful and I hate it.", "The bus leaves at nine."])
    assert 0.5 < good <= 1 and -1 <= bad < -0.5 and flat == 0.0


def test_weighted_sum_of_sources():
    comb = CombinedReward([RewardSource("vader", 2.0), RewardSource("ppo_tiny:letter_reward", -1.0)], CPU)
    prompts, responses = ["a", "b"], ["I love sunny days", "terrible news everywhere"]
    total, terms = comb(prompts, responses)
    vader = torch.tensor(load_reward("vader", CPU)(prompts, responses))
    letters = torch.tensor(letter_reward(prompts, responses))
    torch.testing.assert_close(total, 2 * vader - letters)
    assert set(terms) == {"vader", "ppo_tiny.letter_reward"}


def test_reward_function_returning_wrong_length(tmp_path, monkeypatch):
    (tmp_path / "bad_rewards_mod.py").write_text("def f(prompts, responses):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    comb = CombinedReward([RewardSource("bad_rewards_mod:f")], CPU)
    with pytest.raises(UserError, match="returned 1 values for 2 responses"):
        comb(["a", "b"], ["x", "y"])


def test_reward_model_retokenizes_text_with_its_own_tokenizer(tiny):
    """The reward model's vocabulary differs from the policy's: it must score text, not the policy's ids."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = load_reward(tiny["rm"], CPU)
    assert isinstance(rm, RewardModel)
    prompts, responses = ["My car broke down.", "Tell me about rain."], ["That sounds hard.", "Rain is lovely and calm on a quiet day."]
    got = rm(prompts, responses)
    tok = AutoTokenizer.from_pretrained(tiny["rm"])
    policy_tok = AutoTokenizer.from_pretrained(tiny["policy"])
    assert tok.get_vocab() != policy_tok.get_vocab()
    model = AutoModelForSequenceClassification.from_pretrained(tiny["rm"]).eval()
    for p, r, g in zip(prompts, responses, got):  # one at a time: no padding involved
        text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            want = model(**ids).logits[0, 0].item()
        assert g == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_reward_model_needs_one_label(tiny):
    with pytest.raises(UserError, match="has 2 labels"):
        load_reward(tiny["rm2"], CPU)

"""Rollout bookkeeping: masks after EOS, token rewards, running score moments, the KL controller."""
import pytest
import torch

from rlhf_fast.rollout import IGNORE_INDEX, Rollout, RunningMoments, common_prefix, group_size, pad_after_prefix, response_mask, token_rewards
from rlhf_fast.trainers.ppo import KLController, explained_variance


def test_response_mask_keeps_first_eos_and_drops_the_rest():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [9, 9, 9, 3]])
    mask = response_mask(ids, eos_ids=[2, 3])
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True] * 4]


def test_labels_ignore_masked_positions():
    ro = Rollout(prompts=["p"], responses=["r"], input_ids=torch.tensor([[1, 4, 5, 2, 2]]), attention_mask=torch.ones(1, 5),
                 prompt_len=2, response_mask=torch.tensor([[True, True, False]]), no_eos=torch.tensor([False]))
    assert ro.labels.tolist() == [[5, 2, IGNORE_INDEX]]
    sub = ro.select(torch.tensor([0]))
    assert torch.equal(sub.input_ids, ro.input_ids) and sub.prompts == ["p"]


def test_token_rewards_put_the_score_on_the_last_token():
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0]])
    r = token_rewards(torch.tensor([1.0, -2.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, -0.15 + 1.0, 0.0], [-0.25 - 2.0, 0.0, 0.0, 0.0]]))


def test_running_moments_match_the_pooled_statistics():
    torch.manual_seed(0)
    parts = [torch.randn(n) * 3 + 1 for n in (5, 17, 2)]
    m = RunningMoments()
    for p in parts:
        m.update(p)
    allx = torch.cat(parts).double()
    assert m.mean == pytest.approx(allx.mean().item()) and m.std == pytest.approx(allx.std(unbiased=False).item())
    m2 = RunningMoments()
    m2.load_state_dict(m.state_dict())
    assert m2.state_dict() == m.state_dict()


def test_adaptive_kl_controller():
    fixed = KLController(0.1, None, 100)
    fixed.update(50.0, 10)
    assert fixed.value == 0.1
    ctl = KLController(0.1, target=1.0, horizon=100)
    ctl.update(5.0, 10)  # far above target: error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(0.9, 10)  # 10% below target
    assert ctl.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 10 / 100))


def test_explained_variance():
    mask = torch.tensor([[True, True, True, False]])
    ret = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    assert explained_variance(ret.clone(), ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 4) + 2.0, ret, mask) == pytest.approx(0.0)


def test_common_prefix_stops_before_the_last_prompt_token():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 9, 9], [1, 2, 3]]) == 2  # [1, 2, 3] must keep its 3 in the batch
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2], [3, 2]]) == 0
    assert common_prefix([[5], [5]]) == 0


def test_padding_goes_after_the_common_prefix():
    ids, mask = pad_after_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 6, 7, 8]], pad_id=0, prefix=2)
    assert ids.tolist() == [[1, 2, 0, 3, 4], [1, 2, 0, 0, 5], [1, 2, 6, 7, 8]]
    assert mask.tolist() == [[1, 1, 0, 1, 1], [1, 1, 0, 0, 1], [1, 1, 1, 1, 1]]
    ids0, mask0 = pad_after_prefix([[1, 2, 3, 4], [1, 2, 5]], pad_id=0, prefix=0)
    assert ids0.tolist() == [[1, 2, 3, 4], [0, 1, 2, 5]] and mask0.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]


def test_group_size_finds_runs_of_identical_prompts():
    assert group_size([[1, 2], [1, 2], [3], [3]]) == 2
    assert group_size([[1], [1], [1]]) == 3
    assert group_size([[1], [2], [1], [2]]) == 1  # not consecutive
    assert group_size([[1], [1], [2]]) == 1  # unequal runs
    assert group_size([[1], [2]]) == 1


def test_sampling_by_inversion_draws_the_softmax():
    """Token frequencies over 200k draws match softmax(scores / T) in float64 (4 standard errors); -inf scores are never
    drawn; a single finite score is always drawn, the last vocabulary entry included."""
    from rlhf_fast.rollout import sample_by_inversion

    torch.manual_seed(0)
    scores = torch.tensor([0.3, -1.2, float("-inf"), 2.0, 0.0, 1.1, -0.4])
    p = torch.softmax(scores.double() / 0.7, -1)
    draws = torch.cat([sample_by_inversion(scores.expand(2000, -1), 0.7) for _ in range(100)])
    freq = torch.bincount(draws, minlength=len(scores)).double() / len(draws)
    assert freq[2] == 0
    torch.testing.assert_close(freq, p, rtol=0, atol=float(4 * (p * (1 - p) / len(draws)).sqrt().max()))
    for hot in (0, 3, 49151):
        one = torch.full((4, 49152), float("-inf"))
        one[:, hot] = 5.0
        assert sample_by_inversion(one, 1.0).tolist() == [hot] * 4


def test_sampling_by_inversion_returns_the_drawn_tokens_logprobs():
    """return_logprobs: the same tokens from the same random stream, and their log-probs equal a float64
    log_softmax(scores / T) at the drawn tokens (a -inf entry included, never drawn)."""
    from rlhf_fast.rollout import sample_by_inversion

    g = torch.Generator().manual_seed(3)
    scores = torch.randn(64, 301, generator=g) * 4
    scores[:, 7] = float("-inf")
    torch.manual_seed(0)
    plain = sample_by_inversion(scores, 0.6)
    torch.manual_seed(0)
    token, logprobs = sample_by_inversion(scores, 0.6, return_logprobs=True)
    assert torch.equal(token, plain) and logprobs.dtype == torch.float32 and (token != 7).all()
    ref = (scores.double() / 0.6).log_softmax(-1).gather(1, token.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(logprobs.double(), ref, rtol=0, atol=5e-6)  # measured: up to 2e-6 (values down to -8), 5 seeds


def test_packed_linears_copy_nothing_under_autocast():
    from rlhf_fast.rollout import packed_linears

    model = _random_llama(0)
    with torch.autocast("cpu", dtype=torch.bfloat16), packed_linears(model, 4):
        assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.9)])
def test_generate_refuses_a_truncated_sampler(top_k, top_p):
    from types import SimpleNamespace

    from rlhf_fast.rollout import generate

    with pytest.raises(ValueError, match=f"gen_cfg: top_k={top_k}, top_p={top_p}: only the full softmax is sampled"):
        generate(None, None, [], SimpleNamespace(top_k=top_k, top_p=top_p), [2], torch.device("cpu"), None)


@pytest.mark.parametrize("scores, temperature, match", [
    (torch.zeros(4), 1.0, r"scores: expected a \[B, V\] float tensor, got torch.float32 \(4,\)"),
    (torch.zeros(2, 4, dtype=torch.long), 1.0, r"scores: expected a \[B, V\] float tensor, got torch.int64"),
    (torch.zeros(2, 4), 0.0, r"temperature: expected > 0, got 0.0"),
    (torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]]), 1.0, "scores: a row has no finite score, or a NaN"),
    (torch.tensor([[0.0, float("nan")]]), 1.0, "scores: a row has no finite score, or a NaN"),
])
def test_sampling_by_inversion_refuses_bad_input(scores, temperature, match):
    from rlhf_fast.rollout import sample_by_inversion

    with pytest.raises(ValueError, match=match):
        sample_by_inversion(scores, temperature)


def _random_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN")
@pytest.mark.parametrize("rows", [1, 3, 16])  # the layout hint: any count of rows must work
def test_packed_linears_equal_a_float64_forward_to_fp32_rounding(rows):
    """The packed forward's logits sit as close to a float64 forward as the plain fp32 forward's do (another summation
    order only), with grad enabled it is the plain forward bit for bit, and on exit every module has its own again."""
    from rlhf_fast.rollout import packed_linears

    model = _random_llama(rows)
    ids = torch.randint(0, 301, (3, 11))
    with torch.no_grad():
        ref = _random_llama(rows).double()(ids).logits  # the same weights (same seed), in float64
        plain = model(ids).logits
        with packed_linears(model, rows):
            patched = [m for m in model.modules() if "forward" in vars(m)]
            packed = model(ids).logits
            with torch.enable_grad():
                assert torch.equal(model(ids).logits, plain)
    assert len(patched) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the (tied) head
    scale = ref.abs().max().item()
    plain_err, packed_err = ((x.double() - ref).abs().max().item() / scale for x in (plain, packed))
    assert 0 < packed_err < 1e-6 and plain_err < 1e-6  # measured: both ~2e-7
    assert not any("forward" in vars(m) for m in model.modules())


def test_packed_linears_leave_other_layers_alone_and_restore_on_error():
    from rlhf_fast.rollout import packed_linears

    model = _random_llama(0)
    model.lm_head = torch.nn.Linear(64, 301, bias=False).to(torch.bfloat16)  # not fp32: keeps its forward
    with pytest.raises(RuntimeError, match="boom"):
        with packed_linears(model, 4):
            assert "forward" not in vars(model.lm_head) and "forward" in vars(model.model.layers[0].mlp.up_proj)
            raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in model.modules())

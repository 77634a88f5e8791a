"""outcome_advantages and reinforce_pp_advantages against plain-Python float64 loops written from the papers."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICES, rel_err
from rlhf_fast import ops

F32_TOL = 2e-7  # measured max rel_err ~6e-8: float64 inside, one rounding to float32 at the end
F64_TOL = 1e-13


# ---------------------------------------------------------------- references (Python loops, float64)
def ref_outcome(scores, gids, valid, estimator, norm=True, eps=1e-6, baseline="none", base=None):
    r = [float(x) for x in scores]
    out = [0.0] * len(r)
    rows = [i for i in range(len(r)) if valid[i]]
    if estimator == "reinforce":
        b = sum(r[i] for i in rows) / len(rows) if (baseline == "batch_mean" and rows) else 0.0
        for i in rows:
            out[i] = r[i] - b
        return out
    if estimator == "remax":
        for i in rows:
            out[i] = r[i] - float(base[i])
        return out
    groups = {}
    for i in rows:
        groups.setdefault(int(gids[i]), []).append(i)
    for members in groups.values():
        k = len(members)
        vals = [r[i] for i in members]
        if k < 2 or max(vals) == min(vals):
            continue  # no baseline information / std 0: advantage 0
        mean = sum(vals) / k
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (k - 1))  # unbiased, as torch.std / verl / TRL
        for i in members:
            if estimator == "rloo":  # leave-one-out baseline, straight from its definition
                out[i] = r[i] - sum(r[j] for j in members if j != i) / (k - 1)
            else:
                out[i] = (r[i] - mean) / (std + eps) if norm else r[i] - mean
    return out


def ref_reinforce_pp(rewards, mask, gamma, whiten=True, eps=1e-8):
    b, t = rewards.shape
    ret = [[0.0] * t for _ in range(b)]
    for i in range(b):
        g = 0.0
        for s in reversed([s for s in range(t) if mask[i, s]]):  # holes skipped: discount counts valid steps
            g = float(rewards[i, s]) + gamma * g
            ret[i][s] = g
    if not whiten:
        return ret
    vals = [ret[i][s] for i in range(b) for s in range(t) if mask[i, s]]
    n = len(vals)
    if n < 2 or max(vals) == min(vals):
        return [[0.0] * t for _ in range(b)]
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return [[(ret[i][s] - mean) / (std + eps) if mask[i, s] else 0.0 for s in range(t)] for i in range(b)]


def random_batch(seed, sizes, binary, p_valid):
    """Groups of the given sizes under shuffled, sparse (possibly negative) ids; a few valid holes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-10**12, 10**12, (len(sizes),), generator=g)
    gids = torch.cat([ids[j].repeat(k) for j, k in enumerate(sizes)])
    perm = torch.randperm(len(gids), generator=g)
    gids = gids[perm]
    scores = torch.randint(0, 2, (len(gids),), generator=g).double() if binary else torch.randn(len(gids), generator=g, dtype=torch.float64)
    valid = torch.rand(len(gids), generator=g) < p_valid
    scores[~valid] = float("nan")  # filtered rows: never read
    return scores, gids, valid


# ---------------------------------------------------------------- outcome_advantages
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sizes=st.lists(st.integers(1, 6), min_size=1, max_size=8),
       binary=st.booleans(), p_valid=st.sampled_from([1.0, 0.7, 0.3]), est=st.sampled_from(["grpo", "rloo", "reinforce", "remax"]),
       norm=st.booleans(), eps=st.sampled_from([0.0, 1e-6, 0.1]), baseline=st.sampled_from(["none", "batch_mean"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_outcome_matches_loop_reference(seed, sizes, binary, p_valid, est, norm, eps, baseline, dtype):
    scores, gids, valid = random_batch(seed, sizes, binary, p_valid)
    scores = scores.to(dtype)
    base = torch.randn(len(scores), dtype=dtype) if est == "remax" else None
    baseline = baseline if est == "reinforce" else "none"
    out = ops.outcome_advantages(scores, gids, estimator=est, norm_adv_by_std=norm, eps=eps, baseline=baseline,
                                 baseline_scores=base, valid=valid)
    assert out.dtype == dtype and out.shape == scores.shape
    expected = torch.tensor(ref_outcome(scores.double(), gids, valid, est, norm, eps, baseline, base), dtype=torch.float64)
    assert rel_err(out, expected) < (F32_TOL if dtype == torch.float32 else F64_TOL)
    assert (out[~valid] == 0).all()


def test_hand_computed_two_groups():
    # scores [1, 0 | 0, 1], groups {a, a, b, b}: each group has mean 1/2, unbiased std sqrt((1/4 + 1/4) / 1) = 1/sqrt(2).
    scores, gids = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64), torch.tensor([5, 5, -2, -2])
    s2 = 1 / math.sqrt(2)
    # GRPO (eps=0): +-(1/2) / (1/sqrt(2)) = +-1/sqrt(2).
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(ops.outcome_advantages(scores, gids, eps=0.0), t(s2, -s2, -s2, s2))
    # Dr.GRPO: r - 1/2.
    torch.testing.assert_close(ops.outcome_advantages(scores, gids, norm_adv_by_std=False), t(0.5, -0.5, -0.5, 0.5))
    # RLOO: the baseline of each sample is the other one's score: 1 - 0 = 1, 0 - 1 = -1.
    torch.testing.assert_close(ops.outcome_advantages(scores, gids, estimator="rloo"), t(1.0, -1.0, -1.0, 1.0))


def test_hand_computed_group_of_three_and_singleton():
    # Group [1, 0, 0]: mean 1/3, deviations (2/3, -1/3, -1/3), unbiased var (4/9 + 1/9 + 1/9) / 2 = 1/3.
    # GRPO (eps=0): (2/3) * sqrt(3) = 2/sqrt(3), -(1/3) * sqrt(3) = -1/sqrt(3). RLOO: 1 - 0 = 1, 0 - (1 + 0)/2 = -1/2.
    # The singleton group (id 9) and the all-equal group (id 4) get 0.
    scores = torch.tensor([1.0, 3.0, 0.0, 0.5, 0.0, 0.5], dtype=torch.float64)
    gids = torch.tensor([1, 9, 1, 4, 1, 4])
    r3 = math.sqrt(3)
    grpo = ops.outcome_advantages(scores, gids, eps=0.0)
    torch.testing.assert_close(grpo, torch.tensor([2 / r3, 0, -1 / r3, 0, -1 / r3, 0], dtype=torch.float64))
    rloo = ops.outcome_advantages(scores, gids, estimator="rloo")
    torch.testing.assert_close(rloo, torch.tensor([1.0, 0, -0.5, 0, -0.5, 0], dtype=torch.float64))


def test_rloo_identity_and_unequal_valid_sizes():
    scores, gids, valid = random_batch(3, [5, 4, 7, 2, 3], binary=False, p_valid=0.8)
    rloo = ops.outcome_advantages(scores, gids, estimator="rloo", valid=valid)
    dr = ops.outcome_advantages(scores, gids, norm_adv_by_std=False, valid=valid)
    for gid in gids.unique():
        sel = (gids == gid) & valid
        k = int(sel.sum())
        if k > 1:  # A_i = k / (k - 1) * (r_i - mean_g), with k the VALID group size
            torch.testing.assert_close(rloo[sel], k / (k - 1) * dr[sel], rtol=1e-14, atol=1e-15)


def test_all_equal_and_tiny_groups_are_exact_zeros():
    # 0.1 three times: the float64 mean is 0.1 + 1.4e-17, not 0.1; the result must still be exactly 0 with eps=0.
    scores = torch.tensor([0.1, 0.1, 0.1, 7.0], dtype=torch.float64)
    for est in ("grpo", "rloo"):
        out = ops.outcome_advantages(scores, torch.tensor([0, 0, 0, 1]), estimator=est, eps=0.0)
        assert torch.equal(out, torch.zeros(4, dtype=torch.float64))
    empty = torch.zeros(0)
    assert ops.outcome_advantages(empty, torch.zeros(0, dtype=torch.int64)).shape == (0,)
    none_valid = ops.outcome_advantages(torch.ones(3), torch.zeros(3, dtype=torch.int64), valid=torch.zeros(3, dtype=torch.bool))
    assert torch.equal(none_valid, torch.zeros(3))


@pytest.mark.parametrize("device", DEVICES)
def test_outcome_on_device(device):
    scores, gids, valid = random_batch(11, [3, 1, 4, 4], binary=True, p_valid=0.8)
    out = ops.outcome_advantages(scores.float().to(device), gids.to(device), valid=valid.to(device))
    assert out.device.type == device
    assert rel_err(out, torch.tensor(ref_outcome(scores, gids, valid, "grpo"), dtype=torch.float64)) < F32_TOL


def _v(n=4, dtype=torch.float32):
    return torch.zeros(n, dtype=dtype)


OUTCOME_ERRORS = [
    (dict(scores=[0.0, 1.0]), TypeError, "scores"),
    (dict(scores=torch.zeros(2, 2)), ValueError, "scores"),
    (dict(scores=torch.zeros(4, dtype=torch.float16)), TypeError, "scores"),
    (dict(scores=torch.tensor([0.0, float("nan"), 1.0, 1.0])), ValueError, "scores: non-finite"),
    (dict(scores=torch.tensor([0.0, float("inf"), 1.0, 1.0])), ValueError, "scores: non-finite"),
    (dict(group_ids=torch.zeros(4)), TypeError, "group_ids"),
    (dict(group_ids=torch.zeros(4, dtype=torch.bool)), TypeError, "group_ids"),
    (dict(group_ids=torch.zeros(3, dtype=torch.int64)), ValueError, "group_ids"),
    (dict(group_ids=torch.zeros(4, dtype=torch.int64, device="meta")), ValueError, "group_ids: expected device"),
    (dict(group_ids=None), ValueError, "group_ids"),
    (dict(estimator="ppo"), ValueError, "estimator"),
    (dict(eps=-1e-6), ValueError, "eps"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(norm_adv_by_std=1), TypeError, "norm_adv_by_std"),
    (dict(baseline="group"), ValueError, "baseline"),
    (dict(baseline="batch_mean"), ValueError, "baseline"),  # only for reinforce
    (dict(estimator="remax"), ValueError, "baseline_scores"),
    (dict(baseline_scores=_v()), ValueError, "baseline_scores"),  # rejected for grpo
    (dict(estimator="remax", baseline_scores=_v(3)), ValueError, "baseline_scores"),
    (dict(estimator="remax", baseline_scores=_v(4, torch.float64)), TypeError, "baseline_scores"),
    (dict(estimator="remax", baseline_scores=torch.tensor([0.0, math.inf, 0.0, 0.0])), ValueError, "baseline_scores: non-finite"),
    (dict(valid=torch.ones(3, dtype=torch.bool)), ValueError, "valid"),
    (dict(valid=torch.full((4,), 2)), ValueError, "valid"),
]


@pytest.mark.parametrize("kwargs,exc,match", OUTCOME_ERRORS)
def test_outcome_errors(kwargs, exc, match):
    args = dict(scores=torch.tensor([0.0, 1.0, 1.0, 0.0]), group_ids=torch.tensor([0, 0, 1, 1])) | kwargs
    with pytest.raises(exc, match=match):
        ops.outcome_advantages(args.pop("scores"), args.pop("group_ids"), **args)


def test_nonfinite_scores_of_invalid_rows_are_ignored():
    scores = torch.tensor([1.0, float("nan"), 0.0, 2.0])
    out = ops.outcome_advantages(scores, torch.tensor([0, 0, 0, 1]), estimator="rloo", valid=torch.tensor([True, False, True, True]))
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, -1.0, 0.0]))  # group 0 = {1, 0}: 1 - 0, 0 - 1


# ---------------------------------------------------------------- reinforce_pp_advantages
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 5), t=st.integers(1, 12), gamma=st.sampled_from([1.0, 0.99, 0.5, 0.0]),
       p_valid=st.sampled_from([1.0, 0.6, 0.1]), whiten=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_reinforce_pp_matches_loop_reference(seed, b, t, gamma, p_valid, whiten, dtype):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) < p_valid
    rewards[~mask] = float("nan")  # masked positions are never read
    out = ops.reinforce_pp_advantages(rewards.to(dtype), mask, gamma=gamma, whiten=whiten)
    expected = torch.tensor(ref_reinforce_pp(rewards.to(dtype).double(), mask, gamma, whiten), dtype=torch.float64)
    assert out.dtype == dtype
    assert rel_err(out, expected) < (F32_TOL if dtype == torch.float32 else F64_TOL)
    assert (out[~mask] == 0).all()


def test_reinforce_pp_hand_computed_with_hole():
    # Row [1, hole, 2, 3], gamma 1/2, valid steps counted only: G_3 = 3, G_2 = 2 + 3/2 = 3.5, G_0 = 1 + 3.5/2 = 2.75.
    rewards = torch.tensor([[1.0, 100.0, 2.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True]])
    ret = ops.reinforce_pp_advantages(rewards, mask, gamma=0.5, whiten=False)
    torch.testing.assert_close(ret, torch.tensor([[2.75, 0.0, 3.5, 3.0]], dtype=torch.float64))
    # Whitened (eps=0): mean 37/12, deviations (-1/3, 0, 5/12, -1/12), unbiased var (16+25+1)/144/2 = 7/48.
    adv = ops.reinforce_pp_advantages(rewards, mask, gamma=0.5, eps=0.0)
    s = math.sqrt(7 / 48)
    torch.testing.assert_close(adv, torch.tensor([[-1 / 3 / s, 0.0, 5 / 12 / s, -1 / 12 / s]], dtype=torch.float64))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_holes_match_gae(gamma):
    # Same hole semantics as ops.gae: with values = 0 and lam = 1 GAE's returns are the discounted return-to-go.
    g = torch.Generator().manual_seed(5)
    rewards, mask = torch.randn(4, 9, generator=g), torch.rand(4, 9, generator=g) < 0.6
    _, gae_ret = ops.gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0, backend="torch")
    ret = ops.reinforce_pp_advantages(rewards, mask, gamma=gamma, whiten=False)
    assert rel_err(ret, gae_ret) < 1e-6


def test_reinforce_pp_degenerate_batches():
    one = torch.tensor([[False, True, False]])
    assert torch.equal(ops.reinforce_pp_advantages(torch.ones(1, 3), one), torch.zeros(1, 3))
    # All returns equal (rewards only at the last valid token, all 0.1): exact zeros even with eps=0.
    r = torch.tensor([[0.0, 0.1], [0.0, 0.1], [0.0, 0.1]], dtype=torch.float64)  # float64 mean 0.1 + 1.4e-17
    out = ops.reinforce_pp_advantages(r, torch.tensor([[False, True]] * 3), eps=0.0)
    assert torch.equal(out, torch.zeros(3, 2, dtype=torch.float64))
    assert torch.equal(ops.reinforce_pp_advantages(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool)), torch.zeros(2, 3))
    assert ops.reinforce_pp_advantages(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool)).shape == (0, 4)


RPP_ERRORS = [
    (dict(token_rewards=torch.zeros(4)), ValueError, "token_rewards"),
    (dict(token_rewards=torch.zeros(2, 3, dtype=torch.bfloat16)), TypeError, "token_rewards"),
    (dict(token_rewards=torch.tensor([[0.0, math.nan, 0.0], [0.0] * 3])), ValueError, "token_rewards: non-finite"),
    (dict(response_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "response_mask"),
    (dict(response_mask=torch.full((2, 3), 0.5)), ValueError, "response_mask"),
    (dict(response_mask=torch.ones(2, 3, dtype=torch.bool, device="meta")), ValueError, "response_mask: expected device"),
    (dict(gamma=1.5), ValueError, "gamma"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(whiten="yes"), TypeError, "whiten"),
]


@pytest.mark.parametrize("kwargs,exc,match", RPP_ERRORS)
def test_reinforce_pp_errors(kwargs, exc, match):
    args = dict(token_rewards=torch.zeros(2, 3), response_mask=torch.ones(2, 3, dtype=torch.bool)) | kwargs
    with pytest.raises(exc, match=match):
        ops.reinforce_pp_advantages(args.pop("token_rewards"), args.pop("response_mask"), **args)

"""kl_penalty, gae, PPO losses and masked reductions against plain float64 formulas."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import backends_for, rel_err
from rlhf_fast import ops
from rlhf_fast.ops import _backend
from rlhf_fast.ops import reference as R

GAE_BACKENDS = backends_for("torch", "cpp", "triton")
LOSS_AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


def random_mask(g, b, t, p_valid=0.7):
    mask = torch.rand(b, t, generator=g) < p_valid
    if b > 1:
        mask[0] = False  # a fully masked row
    return mask


# ---------------------------------------------------------------- kl_penalty
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 50), est=st.sampled_from(["k1", "k2", "k3", "abs"]))
def test_kl_penalty_estimators(seed, n, est):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(n, generator=g, dtype=torch.float64) - 2
    ref = lp + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    out = ops.kl_penalty(lp.float(), ref.float(), est)
    log_r = (ref - lp).numpy()
    expected = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": np.exp(log_r) - 1 - log_r, "abs": np.abs(log_r)}[est]
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-4, atol=1e-6)
    if est in ("k2", "k3", "abs"):
        assert (out >= 0).all()


def test_k3_is_unbiased_for_the_true_kl():
    # E_{x~pi}[k1] = E_{x~pi}[k3] = KL(pi || ref) (Schulman 2020): check on an explicit categorical pair.
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(20, generator=g, dtype=torch.float64), 0)
    logq = torch.log_softmax(torch.randn(20, generator=g, dtype=torch.float64), 0)
    true_kl = (logp.exp() * (logp - logq)).sum()
    for est in ("k1", "k3"):
        expected = (logp.exp() * ops.kl_penalty(logp, logq, est)).sum()
        assert abs(expected - true_kl) < 1e-12


# ---------------------------------------------------------------- gae
@pytest.mark.parametrize("backend", GAE_BACKENDS)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 6), t=st.integers(1, 40), gamma=st.sampled_from([1.0, 0.99, 0.5, 0.0]),
       lam=st.sampled_from([0.95, 1.0, 0.0]), p_valid=st.sampled_from([0.2, 0.7, 1.0]))
def test_gae_matches_textbook_recursion(backend, seed, b, t, gamma, lam, p_valid):
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    mask = random_mask(g, b, t, p_valid)
    adv, ret = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    ref_adv, ref_ret = R.gae_per_row(rewards.double(), values.double(), mask, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32
    assert rel_err(adv, ref_adv) <= 1e-5 and rel_err(ret, ref_ret) <= 1e-5
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_skips_holes_exactly():
    # A hole (e.g. tool output inside a response) must not change the valid positions' advantages.
    rewards = torch.tensor([[0.0, 0.5, 9.0, 9.0, 1.0]])
    values = torch.tensor([[0.1, 0.2, 7.0, 7.0, 0.3]])
    mask = torch.tensor([[1, 1, 0, 0, 1]], dtype=torch.bool)
    adv, _ = ops.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    dense, _ = ops.gae(rewards[:, [0, 1, 4]], values[:, [0, 1, 4]], mask[:, [0, 1, 4]], gamma=0.9, lam=0.8)
    assert torch.allclose(adv[:, [0, 1, 4]], dense) and (adv[:, 2:4] == 0).all()
    # and by hand: delta_4 = 1 - 0.3; A_1 = 0.5 + 0.9*0.3 - 0.2 + 0.72*A_4; A_0 = 0 + 0.9*0.2 - 0.1 + 0.72*A_1
    a4 = 0.7
    a1 = 0.5 + 0.27 - 0.2 + 0.72 * a4
    a0 = 0.18 - 0.1 + 0.72 * a1
    assert torch.allclose(dense, torch.tensor([[a0, a1, a4]]))


def test_gae_python_loop_reference_agrees_with_textbook():
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(5, 17, generator=g, dtype=torch.float64), torch.randn(5, 17, generator=g, dtype=torch.float64)
    mask = random_mask(g, 5, 17)
    for a, b in zip(R.gae(rewards, values, mask, 0.97, 0.9), R.gae_per_row(rewards, values, mask, 0.97, 0.9)):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.skipif("cpp" not in GAE_BACKENDS, reason="C++ extension not built")
def test_gae_cpp_many_rows_in_parallel():
    g = torch.Generator().manual_seed(2)
    rewards, values = torch.randn(300, 64, generator=g), torch.randn(300, 64, generator=g)
    mask = random_mask(g, 300, 64)
    adv, ret = ops.gae(rewards, values, mask, backend="cpp")
    ref_adv, ref_ret = R.gae(rewards.double(), values.double(), mask)
    assert rel_err(adv, ref_adv) <= 1e-5 and rel_err(ret, ref_ret) <= 1e-5


@pytest.mark.skipif("cuda" not in ops.available_backends(), reason="needs the CUDA build of the extension and a GPU")
@pytest.mark.parametrize("b,t", [(1, 1), (3, 40), (300, 17)])  # 300 rows: several thread blocks
def test_gae_cuda_extension_matches_textbook(b, t):
    g = torch.Generator().manual_seed(b + t)
    rewards, values = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    mask = random_mask(g, b, t)
    adv, ret = ops.gae(rewards.cuda(), values.cuda(), mask.cuda(), gamma=0.99, lam=0.9, backend="cuda")
    ref_adv, ref_ret = R.gae_per_row(rewards.double(), values.double(), mask, 0.99, 0.9)
    assert rel_err(adv, ref_adv) <= 1e-5 and rel_err(ret, ref_ret) <= 1e-5
    assert (adv.cpu()[~mask] == 0).all() and (ret.cpu()[~mask] == 0).all()


def test_gae_falls_back_without_extension(monkeypatch):
    monkeypatch.setattr(_backend, "_ext", lambda: None)
    assert "cpp" not in ops.available_backends() and "torch" in ops.available_backends()
    rewards, values = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    adv, _ = ops.gae(rewards, values, mask)  # auto -> torch
    assert rel_err(adv, R.gae_per_row(rewards.double(), values.double(), mask)[0]) <= 1e-6
    with pytest.raises(RuntimeError, match="backend"):
        ops.gae(rewards, values, mask, backend="cpp")


def test_triton_unavailable_without_its_kernels_package(monkeypatch):
    # Source tree without `pip install`: triton imports but rlhf_fast_kernels does not; "auto" must not pick it.
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rlhf_fast_kernels" else find_spec(name, *a))
    assert "triton" not in ops.available_backends()
    with pytest.raises(RuntimeError, match="triton"):
        ops.gae(torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool), backend="triton")


# ---------------------------------------------------------------- PPO losses
def policy_loss_f64(lp, old, adv, mask, loss_agg, clip_lo, clip_hi, dual):
    """Per-token loop, float64, straight from the formulas: the oracle for ppo_policy_loss."""
    lp, old, adv, mask = (x.double().tolist() for x in (lp, old, adv, mask.double()))
    per_row, rows, n_tok, clipped = [], 0, 0, 0
    total_tok = 0.0
    for r in range(len(lp)):
        s, c = 0.0, 0
        for t in range(len(lp[r])):
            if not mask[r][t]:
                continue
            ratio = math.exp(lp[r][t] - old[r][t])
            a = adv[r][t]
            u, cl = -a * ratio, -a * min(max(ratio, 1 - clip_lo), 1 + clip_hi)
            loss = max(u, cl)
            if dual is not None and a < 0:
                loss = min(loss, -a * dual)
            clipped += cl > u
            s, c = s + loss, c + 1
        total_tok += s
        n_tok += c
        if c:
            rows += 1
            per_row.append((s, c))
    if loss_agg == "token-mean":
        value = total_tok / max(n_tok, 1)
    elif loss_agg == "seq-mean-token-mean":
        value = sum(s / c for s, c in per_row) / max(rows, 1)
    else:
        value = sum(s for s, _ in per_row) / max(rows, 1)
    return value, clipped / max(n_tok, 1)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 4), t=st.integers(1, 12),
       clip=st.sampled_from([(0.2, None, None), (0.2, 0.28, None), (0.1, None, 3.0), (0.3, 0.4, 1.5)]))
def test_ppo_policy_loss_matches_formula(loss_agg, seed, b, t, clip):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(b, t, generator=g, dtype=torch.float64) - 2
    old = lp + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = random_mask(g, b, t)
    clip_eps, clip_eps_high, dual = clip
    lp_leaf = lp.float().requires_grad_()
    loss, stats = ops.ppo_policy_loss(lp_leaf, old.float(), adv.float(), mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual, loss_agg=loss_agg)
    value, clipfrac = policy_loss_f64(lp, old, adv, mask, loss_agg, clip_eps, clip_eps_high or clip_eps, dual)
    assert abs(loss.item() - value) <= 1e-5 * (1 + abs(value))
    assert abs(stats["clipfrac"].item() - clipfrac) <= 1e-6
    ratio = (lp - old).exp()
    n = mask.sum().clamp(min=1)
    assert abs(stats["approx_kl"].item() - (((ratio - 1) - (lp - old)) * mask).sum().item() / n) <= 1e-5
    assert abs(stats["ratio_mean"].item() - (ratio * mask).sum().item() / n) <= 1e-5
    expect_max = ratio[mask].max().item() if mask.any() else 0.0
    assert abs(stats["ratio_max"].item() - expect_max) <= 1e-5 * (1 + expect_max)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    # gradient vs autograd through the float64 version of the same op
    loss.backward()
    lp64 = lp.clone().requires_grad_()
    ops.ppo_policy_loss(lp64, old, adv, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual, loss_agg=loss_agg)[0].backward()
    assert rel_err(lp_leaf.grad, lp64.grad) <= 1e-5
    assert (lp_leaf.grad[~mask] == 0).all()


def test_ppo_policy_loss_clipping_stops_gradient():
    lp = torch.tensor([[0.5, -0.5, 0.0]], requires_grad=True)  # ratios e^.5 (above 1.2), e^-.5 (below 0.8), 1
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    loss, stats = ops.ppo_policy_loss(lp, old, adv, torch.ones(1, 3, dtype=torch.bool))
    loss.backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] == 0 and lp.grad[0, 2] != 0
    assert abs(stats["clipfrac"].item() - 2 / 3) < 1e-6


def test_ppo_policy_loss_no_valid_token_is_zero_not_nan():
    lp = torch.randn(2, 3, requires_grad=True)
    loss, stats = ops.ppo_policy_loss(lp, lp.detach() + 100, torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0 and all(torch.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_ppo_value_loss_matches_formula(loss_agg):
    g = torch.Generator().manual_seed(3)
    v, old_v, ret = (torch.randn(4, 9, generator=g, dtype=torch.float64) for _ in range(3))
    mask = random_mask(g, 4, 9)
    loss, stats = ops.ppo_value_loss(v, old_v, ret, mask, clip_eps=0.2, loss_agg=loss_agg)
    a, b = (v - ret) ** 2, (old_v + (v - old_v).clamp(-0.2, 0.2) - ret) ** 2
    per = 0.5 * torch.maximum(a, b) * mask
    rows = mask.any(-1)
    expected = {
        "token-mean": per.sum() / mask.sum(),
        "seq-mean-token-mean": (per.sum(-1)[rows] / mask.sum(-1)[rows]).mean(),
        "seq-mean-token-sum": per.sum(-1)[rows].mean(),
    }[loss_agg]
    assert abs(loss.item() - expected.item()) < 1e-10
    assert abs(stats["vf_clipfrac"].item() - ((b > a) & ((v - old_v).abs() > 0.2) & mask).sum().item() / mask.sum().item()) < 1e-6
    # inside the clip range the two terms differ by rounding only: not counted as clipped
    # (fp32 pairs where old + (v - old) != v, with returns on the side where that makes the clipped term larger)
    v32, old32 = torch.rand(8, 256, generator=g), torch.rand(8, 256, generator=g) * 0.1
    off = (old32 + (v32 - old32)) - v32
    ret32 = v32 - torch.sign(off)
    assert ((old32 + (v32 - old32) - ret32).square() > (v32 - ret32).square()).sum() > 0  # "clipped term larger" by rounding
    near = ops.ppo_value_loss(v32, old32, ret32, off != 0, clip_eps=0.2 + 1.0, loss_agg=loss_agg)[1]["vf_clipfrac"]
    assert near.item() == 0.0


# ---------------------------------------------------------------- masked reductions
def test_masked_mean_and_whiten_match_numpy():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    mask = random_mask(g, 5, 7)
    xs = x.numpy()[mask.numpy()]
    assert abs(ops.masked_mean(x, mask).item() - xs.mean()) < 1e-12
    per_row = ops.masked_mean(x, mask, dim=1)
    for r in range(5):
        row = x[r][mask[r]].numpy()
        assert abs(per_row[r].item() - (row.mean() if row.size else 0.0)) < 1e-12
    w = ops.masked_whiten(x, mask)
    np.testing.assert_allclose(w.numpy()[mask.numpy()], (xs - xs.mean()) / np.sqrt(xs.var(ddof=1) + 1e-8), rtol=1e-9)
    assert (w[~mask] == 0).all()
    w2 = ops.masked_whiten(x, mask, shift_mean=False)
    np.testing.assert_allclose(w2.numpy()[mask.numpy()], (xs - xs.mean()) / np.sqrt(xs.var(ddof=1) + 1e-8) + xs.mean(), rtol=1e-9)


def test_masked_mean_ignores_inf_at_masked_positions():
    x = torch.tensor([1.0, float("inf"), 3.0])
    assert ops.masked_mean(x, torch.tensor([True, False, True])).item() == 2.0
    assert ops.masked_mean(x, torch.zeros(3, dtype=torch.bool)).item() == 0.0

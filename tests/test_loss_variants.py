"""Policy-loss variants (CISPO, SAPO, GSPO's sequence ratio, Dr.GRPO's aggregation, the in-loss KL and its clamp)
against float64 references written from the papers' formulas, and the single-pass loss against the composed ops."""
import math

import pytest
import torch

from conftest import backends_for, composed_ppo_loss, f64, leaf, rel_err
from rlhf_fast import ops
from rlhf_fast.ops import reference as R
from rlhf_fast.ops.ppo import agg_weights
from rlhf_fast.trainers.backend import Backend, aggregate

POLICIES = ["ppo_clip", "cispo", "sapo"]
RATIOS = ["token", "sequence"]
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
# Per variant: its clip settings; taus far apart so that swapping them cannot pass.
VARIANT_KW = {"ppo_clip": dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0), "cispo": dict(clip_eps=0.2, clip_eps_high=0.28),
              "sapo": dict(sapo_tau_pos=0.7, sapo_tau_neg=3.0)}
NORM_LENGTH = 11  # Dr.GRPO's constant L, on purpose != T


def awkward_mask(b, t, g):
    """Holes, row 1 with no valid token, row 2 with exactly one."""
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[1] = False
    mask[2] = False
    mask[2, t // 2] = True
    return mask


def ref_policy_loss(lp, old, adv, mask, *, policy_loss, importance_ratio, loss_agg, clip_eps=0.2, clip_eps_high=None,
                    dual_clip=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05, length=None):
    """Loop over rows and tokens, straight from the papers (PPO eq. 7, CISPO eq. 4-5, SAPO's gate, GSPO eq. 5-7,
    Dr.GRPO's constant normaliser). Returns (differentiable loss, clipfrac)."""
    lo, hi = clip_eps, clip_eps_high or clip_eps
    B, T = lp.shape
    row_sums, row_counts, clipped = [], [], 0
    for b in range(B):
        idx = mask[b].nonzero().flatten().tolist()
        s = torch.exp(sum(lp[b, t] - old[b, t] for t in idx) / len(idx)) if idx else None  # GSPO's s_i
        total = lp.new_zeros(())
        for t in idx:
            r = s if importance_ratio == "sequence" else torch.exp(lp[b, t] - old[b, t])
            a = adv[b, t]
            if policy_loss == "ppo_clip":
                u, c = -a * r, -a * torch.clamp(r, 1 - lo, 1 + hi)
                loss = torch.maximum(u, c)
                clipped += bool(c > u)
                if dual_clip is not None and a < 0:
                    loss = torch.minimum(loss, -a * dual_clip)
            elif policy_loss == "cispo":
                w = torch.clamp(r, 1 - lo, 1 + hi).detach()
                clipped += bool(w != r)
                loss = -w * a * lp[b, t]
            else:
                tau = sapo_tau_pos if a > 0 else sapo_tau_neg
                loss = -a * torch.sigmoid(tau * (r - 1)) * 4 / tau
            total = total + loss
        row_sums.append(total)
        row_counts.append(len(idx))
    n = sum(row_counts)
    full = [(s, c) for s, c in zip(row_sums, row_counts) if c]
    if loss_agg == "token-mean":
        value = sum(row_sums) / max(n, 1)
    elif loss_agg == "seq-mean-token-mean":
        value = sum(s / c for s, c in full) / max(len(full), 1)
    elif loss_agg == "seq-mean-token-sum":
        value = sum(s for s, _ in full) / max(len(full), 1)
    else:
        value = sum(row_sums) / (B * (length or T))
    return value, clipped / max(n, 1)


def token_inputs(seed, b=4, t=7, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(b, t, generator=g, dtype=torch.float64) - 2
    old = lp + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    return lp, old, adv, awkward_mask(b, t, g)


@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("importance_ratio", RATIOS)
@pytest.mark.parametrize("policy_loss", POLICIES)
def test_ppo_policy_loss_variants_match_paper_formulas(policy_loss, importance_ratio, loss_agg):
    lp, old, adv, mask = token_inputs(1, spread=1.0 if importance_ratio == "sequence" else 0.5)
    kw = VARIANT_KW[policy_loss]
    length = NORM_LENGTH if loss_agg == "seq-mean-token-sum-norm" else None
    x = leaf(lp)
    loss, stats = ops.ppo_policy_loss(x, old, adv, mask, policy_loss=policy_loss, importance_ratio=importance_ratio,
                                      loss_agg=loss_agg, loss_norm_length=length, **kw)
    loss.backward()
    y = leaf(lp)
    ref, clipfrac = ref_policy_loss(y, old, adv, mask, policy_loss=policy_loss, importance_ratio=importance_ratio,
                                    loss_agg=loss_agg, length=length, **kw)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-12 * (1 + abs(ref.item()))
    assert rel_err(x.grad, y.grad, atol=1e-12) <= 1e-12 and (x.grad[~mask] == 0).all()
    assert stats["clipfrac"].item() == pytest.approx(clipfrac, abs=1e-7)  # a float32 fraction
    if policy_loss == "sapo":
        assert clipfrac == 0
    else:
        assert 0 < clipfrac < 1  # the inputs exercise both sides of the clip


def test_cispo_gradient_is_stop_gradient_weight_times_reinforce():
    # ratios e^.5 (above 1.28), e^-.5 (below 0.8), e^.1 (inside): dloss/dlogp_t = -clip(r_t) A_t / n, nothing more
    old = torch.zeros(1, 3, dtype=torch.float64)
    lp = torch.tensor([[0.5, -0.5, 0.1]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.5, -2.0, 0.7]], dtype=torch.float64)
    loss, stats = ops.ppo_policy_loss(lp, old, adv, torch.ones(1, 3, dtype=torch.bool), policy_loss="cispo", clip_eps_high=0.28)
    loss.backward()
    w = torch.tensor([[1.28, 0.8, math.exp(0.1)]], dtype=torch.float64)
    assert torch.allclose(lp.grad, -w * adv / 3, rtol=1e-15, atol=0)  # a gradient through w would add -A w lp / 3
    assert loss.item() == pytest.approx((-w * adv * lp.detach()).mean().item(), rel=1e-15)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)


def test_sapo_gate_is_one_on_policy_and_follows_the_paper_gradient():
    adv = torch.tensor([[1.3, -0.4, 2.0, -1.1]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    tau_pos, tau_neg = 0.7, 3.0
    tau = torch.tensor([[tau_pos, tau_neg, tau_pos, tau_neg]], dtype=torch.float64)
    old = torch.full((1, 4), -1.0, dtype=torch.float64)
    # r = 1: f(1) = sigmoid(0) 4 / tau = 2 / tau; df/dr = 4 sigmoid(0) (1 - sigmoid(0)) = 1, i.e. the gradient of -A r
    lp = old.clone().requires_grad_()
    loss, _ = ops.ppo_policy_loss(lp, old, adv, mask, policy_loss="sapo", sapo_tau_pos=tau_pos, sapo_tau_neg=tau_neg)
    loss.backward()
    assert loss.item() == pytest.approx((-adv * 2 / tau).mean().item(), rel=1e-15)
    plain = old.clone().requires_grad_()
    (-adv * torch.exp(plain - old)).mean().backward()
    assert torch.allclose(lp.grad, plain.grad, rtol=1e-15, atol=0) and torch.allclose(lp.grad, -adv / 4, rtol=1e-15, atol=0)
    # off-policy: dloss/dlogp = -A 4 s (1 - s) r / n with s = sigmoid(tau (r - 1)) (the paper's soft weight)
    lp = (old + torch.tensor([[0.3, -0.6, -0.2, 0.8]], dtype=torch.float64)).requires_grad_()
    ops.ppo_policy_loss(lp, old, adv, mask, policy_loss="sapo", sapo_tau_pos=tau_pos, sapo_tau_neg=tau_neg)[0].backward()
    r = torch.exp(lp.detach() - old)
    s = torch.sigmoid(tau * (r - 1))
    assert torch.allclose(lp.grad, -adv * 4 * s * (1 - s) * r / 4, rtol=1e-14, atol=0)


@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("policy_loss", POLICIES)
def test_sequence_ratio_with_equal_token_log_ratios_is_token_level(policy_loss, loss_agg):
    g = torch.Generator().manual_seed(4)
    lp, _, _, mask = token_inputs(4)
    shift = torch.tensor([0.3, -0.1, -0.5, 0.05], dtype=torch.float64)  # above, inside, below the clip, inside
    old = torch.where(mask, lp - shift[:, None], 50.0)  # garbage off the mask must not enter the row's mean
    adv = torch.randn(4, 1, generator=g, dtype=torch.float64).expand(4, 7).contiguous()  # GSPO: one A per sequence
    out = {}
    for ratio in RATIOS:
        x = leaf(lp)
        loss, stats = ops.ppo_policy_loss(x, old, adv, mask, policy_loss=policy_loss, importance_ratio=ratio, loss_agg=loss_agg,
                                          **VARIANT_KW[policy_loss])
        loss.backward()
        out[ratio] = loss, x.grad, stats
    (a, ga, sa), (b, gb, sb) = out["token"], out["sequence"]
    assert abs(a.item() - b.item()) <= 1e-12 * (1 + abs(a.item())) and rel_err(ga, gb, atol=1e-12) <= 1e-12
    for k in ("clipfrac", "ratio_mean", "ratio_max", "approx_kl"):
        assert sa[k].item() == pytest.approx(sb[k].item(), rel=1e-12, abs=1e-15), k


def test_dr_grpo_weights_are_one_over_rows_times_length():
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(2, 3, 8, generator=g) > 0.4  # leading dims are rows: B = 6
    mask[0, 1] = False
    for length, denom in ((None, 6 * 8), (13, 6 * 13)):
        w = agg_weights(mask, "seq-mean-token-sum-norm", torch.float64, loss_norm_length=length)
        assert torch.equal(w, mask.double() / denom)
        other = agg_weights(torch.ones_like(mask), "seq-mean-token-sum-norm", torch.float64, loss_norm_length=length)
        assert torch.equal(w[mask], other[mask])  # the constant ignores the valid counts
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    m = mask[0]  # [3, 8], row 1 empty: still counted in B
    assert aggregate(x, m, "seq-mean-token-sum-norm", 13).item() == pytest.approx((x * m).sum().item() / (3 * 13), rel=1e-15)
    assert aggregate(x, m, "seq-mean-token-sum-norm").item() == pytest.approx((x * m).sum().item() / (3 * 8), rel=1e-15)


def test_kl_log_ratio_clip_bounds_k3_and_is_exact_inside():
    lp = torch.tensor([-2.0, -2.0, -1.0], dtype=torch.float64, requires_grad=True)
    ref = lp.detach() + torch.tensor([39.0, -39.0, 0.0])
    assert ops.kl_penalty(lp.detach(), ref, "k3")[0].item() == pytest.approx(math.expm1(39) - 39)  # ~8.7e16 unclamped
    kl = ops.kl_penalty(lp, ref, "k3", log_ratio_clip=20.0)
    kl.sum().backward()
    assert kl.tolist() == pytest.approx([math.expm1(20) - 20, math.expm1(-20) + 20, 0.0], rel=1e-15)
    assert torch.isfinite(lp.grad).all() and (lp.grad == 0).all()  # beyond the clamp: no gradient
    g = torch.Generator().manual_seed(6)
    lp = torch.randn(50, generator=g, dtype=torch.float64) - 3
    ref = lp + 10 * torch.rand(50, generator=g, dtype=torch.float64) - 5  # |log r| < 5 < clamp
    for est in ("k1", "k2", "k3", "abs"):
        a, b = leaf(lp), leaf(lp)
        ka, kb = ops.kl_penalty(a, ref, est, log_ratio_clip=5.0), ops.kl_penalty(b, ref, est)
        (ka.sum()).backward()
        (kb.sum()).backward()
        assert torch.equal(ka, kb) and torch.equal(a.grad, b.grad), est


def test_in_loss_kl_of_ppo_policy_loss_is_clamped_k3():
    lp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    old = lp.detach() + torch.tensor([[0.05, -0.1, 0.0]])
    adv = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    log_r = torch.tensor([0.3, 39.0, -0.2], dtype=torch.float64)
    ref = lp.detach() + log_r
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = ops.ppo_policy_loss(lp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    loss.backward()
    base = leaf(lp)
    base_loss, _ = ops.ppo_policy_loss(base, old, adv, mask)
    base_loss.backward()
    x = log_r.clamp(-20, 20)
    k3 = torch.expm1(x) - x
    assert loss.item() == pytest.approx(base_loss.item() + 0.1 * k3.mean().item(), rel=1e-15)
    assert stats["kl"].item() == pytest.approx(k3.mean().item(), rel=1e-15)
    # dk3/dlogp = -(r - 1) inside the clamp, 0 beyond
    dk3 = torch.where(log_r.abs() < 20, -torch.expm1(log_r), 0.0)
    assert torch.allclose(lp.grad[0], base.grad[0] + 0.1 * dk3 / 3, rtol=1e-14, atol=0)


TRITON_CASES = [("cispo", "token", "seq-mean-token-sum-norm"), ("sapo", "token", "token-mean"),
                ("ppo_clip", "sequence", "seq-mean-token-mean")]
CASES = [("torch", p, r, a, (4, 6)) for p in POLICIES for r in RATIOS for a in AGGS]
CASES += [("torch", p, r, "token-mean", (1, 1)) for p in POLICIES for r in RATIOS]  # one token
CASES += [("triton", *c, (4, 6)) for c in TRITON_CASES] if "triton" in backends_for("triton") else []
CASES = [pytest.param(*c, id="{}-{}-{}-{}-{}x{}".format(*c[:4], *c[4])) for c in CASES]


@pytest.mark.parametrize("backend,policy_loss,importance_ratio,loss_agg,shape", CASES)
def test_linear_ppo_loss_variants_equal_composed_ops(backend, policy_loss, importance_ratio, loss_agg, shape):
    B, T = shape
    g = torch.Generator().manual_seed(B * 10 + T)
    H, V = 16, 37
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g).div(4)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = awkward_mask(B, T, g) if B > 2 else torch.ones(B, T, dtype=torch.bool)
    with torch.no_grad():
        base = R.linear_logprobs(hidden.double(), weight.double(), labels)
    old = (base + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (base + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, T, generator=g)
    kw = dict(policy_loss=policy_loss, importance_ratio=importance_ratio, loss_agg=loss_agg, **VARIANT_KW[policy_loss],
              loss_norm_length=NORM_LENGTH if loss_agg == "seq-mean-token-sum-norm" else None)
    h, w = leaf(hidden), leaf(weight)
    loss, stats = ops.linear_ppo_loss(h, w, labels, old, adv, mask, entropy_coef=0.01, ref_logprobs=ref, kl_coef=0.05,
                                      backend=backend, chunk_size=5, **kw)
    (3.0 * loss).backward()  # backward scales the gradients formed in forward
    rh, rw = f64(hidden), f64(weight)
    lp, ent = R.linear_logprobs(rh, rw, torch.where(mask, labels, -100), return_entropy=True)
    ref_loss = composed_ppo_loss(lp, ent, old.double(), adv.double(), mask, entropy_coef=0.01, ref=ref.double(), kl_coef=0.05,
                                 kl_estimator="k3", **kw)
    (3.0 * ref_loss).backward()
    # fp32 against float64: measured <= 1.5e-7 (loss) and 4e-7 (gradients) on the torch cases; ~5-10x margin
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * (abs(ref_loss.item()) + 1.0)
    assert rel_err(h.grad, rh.grad, atol=1e-6) <= 4e-6 and rel_err(w.grad, rw.grad, atol=1e-6) <= 4e-6
    assert rel_err(stats["logprobs"], lp * mask) <= 1e-6
    # stats: those of ppo_policy_loss on the same (float32) log-probs
    _, same = ops.ppo_policy_loss(stats["logprobs"], old, adv, mask, ref_logprobs=ref, kl_coef=0.05, **kw)
    for k in same:
        assert stats[k].item() == pytest.approx(same[k].item(), rel=1e-6, abs=1e-7), k


@pytest.mark.parametrize("kw", [dict(policy_loss="cispo", importance_ratio="sequence", loss_agg="seq-mean-token-sum-norm", loss_norm_length=9),
                                dict(policy_loss="sapo", loss_agg="seq-mean-token-mean", kl_log_ratio_clip=None)])
def test_backend_fused_and_eager_policy_loss_agree(kw):
    g = torch.Generator().manual_seed(8)
    hidden, weight = torch.randn(3, 5, 8, generator=g), torch.randn(23, 8, generator=g).div(3)
    labels = torch.randint(0, 23, (3, 5), generator=g)
    mask = awkward_mask(3, 5, g)
    old = (R.linear_logprobs(hidden, weight, labels) + 0.3 * torch.randn(3, 5, generator=g)).detach()
    ref, adv = old + 0.2 * torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    out = []
    for name in ("fused", "eager"):
        h, w = leaf(hidden), leaf(weight)
        loss, stats = Backend(name).policy_loss(h, w, labels, old, adv, mask, clip_eps=0.2, clip_eps_high=None, dual_clip=None,
                                                entropy_coef=0.01, temperature=1.0, ref_logprobs=ref, kl_coef=0.1, **kw)
        loss.backward()
        out.append((loss, h.grad, w.grad, stats))
    (la, ha, wa, sa), (lb, hb, wb, sb) = out
    assert abs(la.item() - lb.item()) <= 1e-5 * (1 + abs(lb.item())) and rel_err(ha, hb) <= 1e-5 and rel_err(wa, wb) <= 1e-5
    assert sa.keys() == sb.keys() and abs(sa["kl"].item() - sb["kl"].item()) <= 1e-5


@pytest.mark.parametrize("kw,match", [
    (dict(policy_loss="grpo"), "policy_loss: expected one of"),
    (dict(importance_ratio="seq"), "importance_ratio: expected one of"),
    (dict(loss_agg="dr_grpo"), "loss_agg: expected one of"),
    (dict(policy_loss="cispo", dual_clip=3.0), "dual_clip: only for policy_loss='ppo_clip'"),
    (dict(policy_loss="sapo", dual_clip=3.0), "dual_clip: only for policy_loss='ppo_clip'"),
    (dict(loss_agg="seq-mean-token-sum-norm", loss_norm_length=0), "loss_norm_length: expected None or an int >= 1"),
    (dict(loss_norm_length=2.5), "loss_norm_length"),
    (dict(loss_norm_length=True), "loss_norm_length"),
    (dict(policy_loss="sapo", sapo_tau_pos=0.0), "sapo_tau_pos: expected a finite number > 0"),
    (dict(sapo_tau_neg=-1.0), "sapo_tau_neg"),
    (dict(kl_coef=0.1), "ref_logprobs: required when kl_coef > 0"),
    (dict(kl_log_ratio_clip=0.0), "kl_log_ratio_clip"),
    (dict(kl_estimator="k4"), "kl_estimator: expected one of"),
])
def test_bad_variant_arguments_raise_naming_them(kw, match):
    lp, old, adv, mask = torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        ops.ppo_policy_loss(lp, old, adv, mask, **kw)
    hidden, weight, labels = torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        ops.linear_ppo_loss(hidden, weight, labels, old, adv, mask, **kw)


def test_sequence_ratio_and_clip_need_their_inputs():
    with pytest.raises(ValueError, match="importance_ratio: 'sequence' needs"):
        ops.ppo_policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool), importance_ratio="sequence")
    with pytest.raises(ValueError, match="importance_ratio: 'sequence' needs"):
        ops.linear_ppo_loss(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long), torch.zeros(3), torch.zeros(3),
                            torch.ones(3, dtype=torch.bool), importance_ratio="sequence")
    with pytest.raises(ValueError, match="log_ratio_clip: expected a finite number > 0"):
        ops.kl_penalty(torch.zeros(3), torch.zeros(3), "k3", log_ratio_clip=-1.0)

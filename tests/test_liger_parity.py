"""Parity with Liger-Kernel's LigerFusedLinearGRPOLoss (liger_kernel.chunked_loss.grpo_loss, read at 0.8.5) where the
two define the same loss: linear_ppo_loss (torch backend) and Liger, both fp32 from the same hidden states / LM head,
must give the same loss, d loss / d hidden, d loss / d weight, and the KL and clip-fraction statistics.

Mapping (Liger -> rlhf_fast): advantages [B] -> broadcast to [B, T]; epsilon_low/high -> clip_eps/clip_eps_high;
beta with ref_per_token_logps -> kl_coef with ref_logprobs, kl_estimator="k3" (Liger's k3 has no log-ratio clamp,
ours clamps at +-20 nats: inactive here); importance_sampling_level -> importance_ratio; loss_type "grpo"/"sapo" ->
seq-mean-token-mean, "bnpo"/"dapo"/"cispo" -> token-mean (dapo's normaliser is the local mask sum when
num_items_in_batch is None and torch.distributed is off), "dr_grpo" -> seq-mean-token-sum-norm with
loss_norm_length=max_completion_length; delta (INTELLECT-2) -> dual_clip (the same loss when delta > 1 + epsilon_high:
for A > 0 the clip binds first, for A < 0 both cap -A r at -A delta); "cispo" caps the weight at epsilon_high (an
absolute ratio, no lower bound) -> clip_eps_high = epsilon_high - 1 with clip_eps = 1 (lower bound 0, never binds).

Where they differ (not compared): "grpo"/"sapo" divide by all B rows, a row with no valid token counting, we by the
rows with one (test_empty_row pins the factor); cispo's clip fraction (Liger counts weights capped where A > 0, we
any capped weight); Liger refuses "sequence" with cispo/sapo and does not clamp the policy log-ratio (we: +-20);
"luspo" and "vespo" have no counterpart here, nor our entropy bonus or seq-mean-token-sum in Liger.
"""
import pytest
import torch

from conftest import leaf, rel_err
from rlhf_fast import ops

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")

B, T, H, V, MAX_LEN = 3, 5, 8, 37, 8  # MAX_LEN != T so that dr_grpo's constant is checked
TOL = 1e-5  # measured worst 1.8e-6 (a loss value; gradients <= 2.5e-7): fp32 summation order
AGG = {"grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean",
       "cispo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm"}
EL, EH = 0.2, 0.28
# (loss_type, importance_sampling_level, beta, temperature, Liger-only kwargs, rlhf_fast-only kwargs)
CASES = [
    ("grpo", "token", 0.04, 0.7, {}, {}),
    ("grpo", "sequence", 0.04, 1.0, {}, {}),
    ("bnpo", "token", 0.0, 1.0, {}, {}),
    ("dapo", "token", 0.04, 1.0, {}, {}),
    ("dapo", "sequence", 0.1, 0.7, {}, {}),
    ("dr_grpo", "token", 0.04, 1.0, {}, {}),
    ("dr_grpo", "sequence", 0.04, 1.0, {}, {}),
    ("grpo", "token", 0.04, 1.0, dict(delta=1.5), dict(dual_clip=1.5)),
    ("cispo", "token", 0.04, 1.0, dict(epsilon_high=1.3), dict(policy_loss="cispo", clip_eps=1.0, clip_eps_high=0.3)),
    ("sapo", "token", 0.04, 0.7, dict(sapo_temperature_pos=0.7, sapo_temperature_neg=3.0),
     dict(policy_loss="sapo", sapo_tau_pos=0.7, sapo_tau_neg=3.0)),
]


def inputs(temperature, mask):
    """hidden, weight, labels, advantages [B], old and ref log-probs [B, T] set off the current ones so that clipping,
    dual clipping and the KL engage: per-row shifts put row 0 (A > 0) above 1 + EH, row 1 (A < 0) above delta."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    lp = torch.log_softmax(hidden @ weight.T / temperature, -1).gather(-1, labels[..., None])[..., 0]
    shift = torch.tensor([[0.5], [0.45], [-0.1]])
    old = lp - shift - 0.3 * torch.randn(B, T, generator=g)
    ref = lp + 0.5 * torch.randn(B, T, generator=g)
    adv = torch.tensor([0.9, -1.3, 0.6]) * (1 + torch.rand(B, generator=g))
    return hidden, weight, labels, adv, old, ref, mask


HOLES = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)  # row 2: one token


def both(loss_type, level, beta, temperature, liger_kw, our_kw, mask=HOLES):
    hidden, weight, labels, adv, old, ref, mask = inputs(temperature, mask)
    kw = dict(beta=beta, compiled=False, use_ref_model=True, epsilon_low=EL, epsilon_high=EH, loss_type=loss_type,
              max_completion_length=MAX_LEN, importance_sampling_level=level, temperature=temperature)
    h1, w1 = leaf(hidden), leaf(weight)
    loss_l, metrics = liger_grpo.LigerFusedLinearGRPOLoss(**{**kw, **liger_kw})(
        h1, w1, labels, mask.long(), adv, ref_per_token_logps=ref, old_per_token_logps=old)
    loss_l.backward()
    h2, w2 = leaf(hidden), leaf(weight)
    ours = dict(clip_eps=EL, clip_eps_high=EH, ref_logprobs=ref, kl_coef=beta, kl_estimator="k3",
                temperature=temperature, loss_agg=AGG[loss_type], loss_norm_length=MAX_LEN, importance_ratio=level)
    loss_o, stats = ops.linear_ppo_loss(h2, w2, labels, old, adv[:, None].expand(B, T), mask, backend="torch",
                                        **{**ours, **our_kw})
    loss_o.backward()
    return (loss_l, h1.grad, w1.grad, metrics), (loss_o, h2.grad, w2.grad, stats)


@pytest.mark.parametrize("loss_type,level,beta,temperature,liger_kw,our_kw", CASES,
                         ids=[f"{c[0]}-{c[1]}" + ("-delta" if c[4].get("delta") else "") for c in CASES])
def test_matches_liger(loss_type, level, beta, temperature, liger_kw, our_kw):
    (loss_l, gh_l, gw_l, metrics), (loss_o, gh_o, gw_o, stats) = both(loss_type, level, beta, temperature, liger_kw, our_kw)
    errs = [rel_err(loss_o, loss_l), rel_err(gh_o, gh_l), rel_err(gw_o, gw_l)]
    assert max(errs) < TOL, errs
    assert gh_l.norm() > 0 and gw_l.norm() > 0
    if beta:
        assert rel_err(stats["kl"], metrics[0]) < TOL
    if loss_type != "cispo":  # cispo: Liger counts capped weights where A > 0 only (see the module docstring)
        assert abs(stats["clipfrac"].item() - metrics[-1].item()) < 1e-6
    if loss_type not in ("sapo",):  # the clip (or dual clip / cispo cap) must bind somewhere, but not everywhere
        key = "dual_clipfrac" if "dual_clip" in our_kw else "clipfrac"
        assert 0 < stats[key].item() < 1, (key, stats[key])


@pytest.mark.parametrize("loss_type,factor", [("grpo", 2 / 3), ("dapo", 1.0)])
def test_empty_row(loss_type, factor):
    """Row 1 has no valid token: Liger's "grpo" divides by B = 3 rows, ours by the 2 rows with one (so an empty row
    does not shrink the loss); token-mean aggregations agree."""
    mask = HOLES.clone()
    mask[1] = False
    (loss_l, gh_l, gw_l, _), (loss_o, gh_o, gw_o, _) = both(loss_type, "token", 0.04, 1.0, {}, {}, mask)
    errs = [rel_err(loss_o * factor, loss_l), rel_err(gh_o * factor, gh_l), rel_err(gw_o * factor, gw_l)]
    assert max(errs) < TOL, errs
    assert gh_o[1].abs().max() == 0  # the empty row gets no gradient on either side
    assert gh_l[1].abs().max() == 0

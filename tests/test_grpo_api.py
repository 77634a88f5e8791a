"""The GRPO-shaped loss API: on-policy (old_logprobs=None), per-sequence advantages, a global normalizer.

References are float64 on materialized logits, written from the definitions: on-policy the ratio is exactly 1 and
the surrogate's gradient is -A dlogp (REINFORCE with the group baseline inside A)."""
import pytest
import torch
from conftest import backends_for, f64, leaf, rel_err

from rlhf_fast import ops

B, T, H, V = 3, 5, 8, 37


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False  # a short row
    mask[1, 1] = False  # a hole
    labels[~mask] = -100
    adv = torch.randn(B, generator=g)
    return hidden, weight, labels, mask, adv


def _logprobs64(hidden, weight, labels):
    logp = (hidden @ weight.T).log_softmax(-1)
    return logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("backend", backends_for("torch", "triton"))
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_on_policy_loss_is_reinforce_with_ratio_one(backend, loss_agg):
    hidden, weight, labels, mask, adv = _inputs()
    h, w = leaf(hidden), leaf(weight)
    loss, stats = ops.linear_ppo_loss(h, w, labels, None, adv, mask, loss_agg=loss_agg, backend=backend)
    loss.backward()
    h64, w64 = f64(hidden), f64(weight)
    lp = _logprobs64(h64, w64, labels)
    m = mask.double()
    if loss_agg == "token-mean":
        wts = m / m.sum()
    elif loss_agg == "seq-mean-token-mean":
        wts = m / m.sum(-1, keepdim=True) / B
    else:
        wts = m / (B * T)
    ratio = torch.exp(lp - lp.detach())  # 1, with d ratio = d logp
    ref = -(wts * ratio * adv.double()[:, None]).sum()
    ref.backward()
    assert rel_err(loss, ref) < 1e-6
    assert rel_err(h.grad, h64.grad) < 2e-6 and rel_err(w.grad, w64.grad) < 2e-6
    assert float(stats["clipfrac"]) == 0 and float(stats["ratio_mean"]) == 1.0


@pytest.mark.parametrize("importance_ratio", ["token", "sequence"])
def test_on_policy_equals_old_logprobs_detached(importance_ratio):
    hidden, weight, labels, mask, adv = _inputs(1)
    outs = []
    for old in ("none", "detached"):
        h, w = leaf(hidden), leaf(weight)
        lp = ops.linear_logprobs(h, w, labels)
        loss, _ = ops.ppo_policy_loss(lp, None if old == "none" else lp.detach(), adv, mask, importance_ratio=importance_ratio,
                                      loss_agg="seq-mean-token-mean")
        loss.backward()
        outs.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(B,), (B, 1)])
def test_sequence_advantages_broadcast_over_their_row(shape):
    hidden, weight, labels, mask, adv = _inputs(2)
    old = torch.randn(B, T, generator=torch.Generator().manual_seed(5)) * 0.1 - 3.0
    results = []
    for a in (adv.reshape(shape), adv[:, None].expand(B, T).contiguous()):
        h, w = leaf(hidden), leaf(weight)
        loss, _ = ops.linear_ppo_loss(h, w, labels, old, a, mask, backend="torch")
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_global_normalizer_makes_micro_batches_add_up_to_the_batch(loss_agg):
    """DAPO's token-level loss over a batch split in micro-batches: each divides by the batch's count."""
    hidden, weight, labels, mask, adv = _inputs(3)
    old = torch.randn(B, T, generator=torch.Generator().manual_seed(6)) * 0.2 - 3.0
    h, w = leaf(hidden), leaf(weight)
    whole, _ = ops.linear_ppo_loss(h, w, labels, old, adv, mask, loss_agg=loss_agg, backend="torch")
    whole.backward()
    norm = mask.sum().float() if loss_agg == "token-mean" else float(B * T)
    h2, w2 = leaf(hidden), leaf(weight)
    total = 0.0
    for rows in (slice(0, 1), slice(1, 3)):
        part, _ = ops.linear_ppo_loss(h2[rows], w2, labels[rows], old[rows], adv[rows], mask[rows], loss_agg=loss_agg,
                                      normalizer=norm, backend="torch")
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, whole.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h2.grad, h.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w2.grad, w.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs, match", [
    ({"normalizer": 0.0}, "normalizer"),
    ({"normalizer": float("nan")}, "normalizer"),
    ({"normalizer": torch.ones(2)}, "normalizer"),
    ({"normalizer": 4.0, "loss_agg": "seq-mean-token-mean"}, "normalizer"),
    ({"advantages": torch.zeros(B, 2)}, "advantages"),
    ({"advantages": torch.zeros(B + 1)}, "advantages"),
])
def test_errors_name_the_argument(kwargs, match):
    hidden, weight, labels, mask, adv = _inputs()
    kwargs = {"advantages": adv} | kwargs
    a = kwargs.pop("advantages")
    with pytest.raises(ValueError, match=match):
        ops.linear_ppo_loss(hidden, weight, labels, None, a, mask, backend="torch", **kwargs)
    with pytest.raises(ValueError, match=match):
        ops.ppo_policy_loss(torch.zeros(B, T), None, a, mask, **kwargs)

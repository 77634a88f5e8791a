"""The mixed-dtype rule of the fused ops: hidden, weight and bias each in their own float dtype (a bf16 trunk with an
fp32 head, ...), or fp32 inputs under a bf16 autocast. fp32 compute whatever the inputs and the autocast, fp32 outputs,
each gradient in its input's dtype.

References: float64 on materialized logits, written here from the definitions, on the same (rounded) inputs. Values
are fp32 computations of the same function: ~1e-6 relative. A gradient rounded once to its dtype is off by <= eps/2
per entry: the tolerance is eps of that dtype (fp32: 1e-5)."""
import contextlib

import pytest
import torch
from conftest import backends_for, rel_err

from rlhf_fast import ops

B, T, H, V = 2, 5, 16, 37  # V: no power of two; interpreted triton needs tiny shapes
CASES = [  # (hidden, weight, bias or None, autocast dtype or None)
    pytest.param(torch.bfloat16, torch.float32, None, None, id="bf16-hidden-fp32-head"),
    pytest.param(torch.float16, torch.bfloat16, torch.float32, None, id="fp16-hidden-bf16-head-fp32-bias"),
    pytest.param(torch.float32, torch.float32, torch.float32, torch.bfloat16, id="fp32-under-bf16-autocast"),
]
BACKENDS = backends_for("torch", "triton")


def grad_tol(dtype):
    return max(torch.finfo(dtype).eps, 1e-5)


def inputs(seed, h_dtype, w_dtype, b_dtype):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(h_dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(w_dtype)
    bias = None if b_dtype is None else torch.randn(V, generator=g).to(b_dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 3:] = -100  # padding
    labels[1, 1] = -100  # a hole
    return hidden, weight, bias, labels


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def f64(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def log_softmax64(h, w, b):
    z = h @ w.T
    return torch.log_softmax(z if b is None else z + b, dim=-1)


def ref_logprobs(h, w, b, labels):
    logp = log_softmax64(h, w, b)
    valid = labels != -100
    lp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, lp, 0), torch.where(valid, ent, 0)


def autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def check_grads(ours, refs):
    for x, r in zip(ours, refs):
        if x is not None:
            assert x.grad.dtype == x.dtype
            assert rel_err(x.grad, r.grad) <= grad_tol(x.dtype), x.dtype


def same_without_autocast(run, ac, outs, grads):
    """Under autocast, the result must be exactly the one without (nothing downcast)."""
    if ac is None:
        return
    outs2, grads2 = run(None)
    for a, b in zip(outs + grads, outs2 + grads2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h_dtype, w_dtype, b_dtype, ac", CASES)
def test_linear_logprobs_mixed(backend, h_dtype, w_dtype, b_dtype, ac):
    hidden, weight, bias, labels = inputs(0, h_dtype, w_dtype, b_dtype)
    g_lp, g_ent = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)

    def run(ac):
        h, w, b = leaves(hidden, weight, bias)
        with autocast(ac):
            lp, ent = ops.linear_logprobs(h, w, labels, bias=b, return_entropy=True, backend=backend, chunk_size=3)
        (lp * g_lp.float() + ent * g_ent.float()).sum().backward()
        return [lp, ent], [t.grad for t in (h, w, b) if t is not None], (h, w, b)

    (lp, ent), grads, ours = run(ac)
    refs = f64(hidden, weight, bias)
    ref_lp, ref_ent = ref_logprobs(*refs, labels)
    assert lp.dtype == ent.dtype == torch.float32
    assert rel_err(lp, ref_lp) <= 1e-5 and rel_err(ent, ref_ent) <= 1e-5
    (ref_lp * g_lp + ref_ent * g_ent).sum().backward()
    check_grads(ours, refs)
    same_without_autocast(lambda a: run(a)[:2], ac, [lp, ent], grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h_dtype, w_dtype, b_dtype, ac", CASES)
def test_linear_kl_mixed(backend, h_dtype, w_dtype, b_dtype, ac):
    hidden, weight, bias, labels = inputs(1, h_dtype, w_dtype, b_dtype)
    # the reference side in the other dtypes of the case, swapped: every side independent
    ref_hidden, ref_weight, ref_bias, _ = inputs(2, w_dtype, h_dtype, b_dtype)
    g = torch.randn(B, T, dtype=torch.float64)

    def run(ac):
        h, w, b = leaves(hidden, weight, bias)
        with autocast(ac):
            kl = ops.linear_kl(h, w, ref_hidden, ref_weight, labels, bias=b, ref_bias=ref_bias, backend=backend, chunk_size=3)
        (kl * g.float()).sum().backward()
        return [kl], [t.grad for t in (h, w, b) if t is not None], (h, w, b)

    (kl,), grads, ours = run(ac)
    refs = f64(hidden, weight, bias)
    logp, logq = log_softmax64(*refs), log_softmax64(*f64(ref_hidden, ref_weight, ref_bias))
    ref = torch.where(labels != -100, (logp.exp() * (logp - logq)).sum(-1), 0)
    assert kl.dtype == torch.float32
    assert rel_err(kl, ref) <= 1e-5
    (ref * g).sum().backward()
    check_grads(ours, refs)
    same_without_autocast(lambda a: run(a)[:2], ac, [kl], grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h_dtype, w_dtype, b_dtype, ac", CASES)
def test_linear_ppo_loss_mixed(backend, h_dtype, w_dtype, b_dtype, ac):
    hidden, weight, bias, labels = inputs(3, h_dtype, w_dtype, b_dtype)
    mask = labels != -100
    g = torch.Generator().manual_seed(4)
    old = torch.randn(B, T, generator=g) * 0.3 - 3.5  # ratios on both sides of the clip
    ref_lp = torch.randn(B, T, generator=g) * 0.3 - 3.5
    adv = torch.randn(B, T, generator=g)
    eps, ent_coef, kl_coef = 0.2, 0.01, 0.05

    def run(ac):
        h, w, b = leaves(hidden, weight, bias)
        with autocast(ac):
            loss, stats = ops.linear_ppo_loss(h, w, labels, old, adv, mask, bias=b, clip_eps=eps, entropy_coef=ent_coef,
                                              ref_logprobs=ref_lp, kl_coef=kl_coef, kl_estimator="k3", backend=backend,
                                              chunk_size=3)
        (2.0 * loss).backward()
        return [loss, stats["logprobs"], stats["entropies"]], [t.grad for t in (h, w, b) if t is not None], (h, w, b)

    outs, grads, ours = run(ac)
    refs = f64(hidden, weight, bias)
    lp, ent = ref_logprobs(*refs, labels)
    # PPO's clipped surrogate, the entropy bonus and k3 KL to ref, token-mean over the mask, from their definitions
    ratio = torch.exp(lp - old.double())
    a = adv.double()
    surrogate = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps))
    log_r = ref_lp.double() - lp
    per_token = surrogate - ent_coef * ent + kl_coef * (torch.expm1(log_r) - log_r)
    ref_loss = torch.where(mask, per_token, 0).sum() / mask.sum()
    assert all(t.dtype == torch.float32 for t in outs)
    assert abs(outs[0].item() - ref_loss.item()) <= 1e-5 * (1 + abs(ref_loss.item()))
    assert rel_err(outs[1], lp) <= 1e-5 and rel_err(outs[2], ent) <= 1e-5
    (2.0 * ref_loss).backward()
    check_grads(ours, refs)
    same_without_autocast(lambda a: run(a)[:2], ac, outs, grads)


@pytest.mark.parametrize("h_dtype, w_dtype, ac", [(torch.bfloat16, torch.float32, None), (torch.float32, torch.float32, torch.bfloat16)])
def test_linear_fisher_product_mixed(h_dtype, w_dtype, ac):
    hidden, weight, _, labels = inputs(5, h_dtype, w_dtype, None)
    g = torch.Generator().manual_seed(6)
    d_hidden, d_weight = torch.randn(hidden.shape, generator=g).to(h_dtype), torch.randn(weight.shape, generator=g).to(w_dtype)
    temperature = 0.7
    with autocast(ac):
        g_h, g_w = ops.linear_fisher_product(hidden, weight, d_hidden, d_weight, labels, temperature=temperature, chunk_size=3)
    # J^T M J v from the definition: logits tangent dz, M = diag(p) - p p^T per valid token, back through z = h W^T / T
    h, w, dh, dw = (t.double() for t in (hidden, weight, d_hidden, d_weight))
    p = torch.softmax(h @ w.T / temperature, -1)
    dz = (dh @ w.T + h @ dw.T) / temperature
    m_dz = (p * dz - p * (p * dz).sum(-1, keepdim=True)) * (labels != -100)[..., None]
    assert g_h.dtype == h_dtype and g_w.dtype == w_dtype
    assert rel_err(g_h, m_dz @ w / temperature) <= grad_tol(h_dtype)
    assert rel_err(g_w, torch.einsum("btv,bth->vh", m_dz, h) / temperature) <= grad_tol(w_dtype)

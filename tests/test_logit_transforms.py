"""logit_scale / softcap / bias in the fused ops (linear_logprobs, linear_kl, linear_ppo_loss), values and gradients.

The references materialize the logits in float64 from the definition, written out here on their own:
z = softcap * tanh(logit_scale * (h W^T + b) / softcap) / T (Gemma-2/3's final_logit_softcapping after a Cohere /
Granite / Falcon-H1 style head scale), then log_softmax, gather, entropy, KL; the PPO loss composes
ops.ppo_policy_loss on the reference log-probs. Triton runs in the interpreter here: tiny shapes.
"""
import math

import pytest
import torch

from conftest import backends_for, composed_ppo_loss, f64, leaf, make_inputs, rel_err
from rlhf_fast import ops

BACKENDS = backends_for("torch", "triton")
N, H, V, HR = 13, 24, 75, 16  # V not a multiple of any tile; the reference head has another hidden size

# (logit_scale, softcap, temperature, bias, hidden scale). The hidden scale sets |h W^T| ~ that value.
CASES = {
    "scale": (2.5, None, 0.7, True, 2.0),  # Cohere-style scale, no cap
    "saturating-cap": (1.0, 0.5, 1.3, False, 4.0),  # |x| / softcap ~ 8: most of the tanh saturated
    "scale+cap": (0.25, 3.0, 0.8, True, 6.0),  # Granite-style 1 / logits_scaling, then a cap
}
# fp32 against float64, set from the measured errors (largest seen: values 1.9e-6 (KL, a difference), gradients 2.6e-6).
TOL_VALUE, TOL_GRAD = 4e-6, 5e-6


def logits64(h, w, b, temperature, logit_scale, softcap):
    x = h @ w.T
    if b is not None:
        x = x + b
    x = x * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def logprobs64(h, w, b, labels, temperature, logit_scale, softcap):
    """(log-probs, entropy), 0 at ignored labels."""
    logp = torch.log_softmax(logits64(h, w, b, temperature, logit_scale, softcap), dim=-1)
    valid = labels != -100
    lp = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


def kl64(h, w, b, rh, rw, rb, labels, temperature, logit_scale, softcap):
    logp = torch.log_softmax(logits64(h, w, b, temperature, logit_scale, softcap), dim=-1)
    logq = torch.log_softmax(logits64(rh, rw, rb, temperature, logit_scale, softcap), dim=-1)
    return torch.where(labels != -100, (logp.exp() * (logp - logq)).sum(-1), 0.0)


def inputs(seed, n, case, bias_always=False):
    scale, cap, temperature, bias, hscale = CASES[case]
    hidden, weight, b, labels = make_inputs(seed, n, H, V, torch.float32, bias=bias or bias_always, scale=hscale)
    return hidden, weight, b, labels, dict(temperature=temperature, logit_scale=scale, softcap=cap)


def close(out, ref):
    return rel_err(out, ref) <= TOL_VALUE


def check_grads(pairs, atol=1e-7):
    for ours, ref in pairs:
        if ours is not None:
            assert ours.grad is not None and rel_err(ours.grad, ref.grad, atol=atol) <= TOL_GRAD


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_linear_logprobs(backend, case):
    hidden, weight, b, labels, tf = inputs(1, N, case)
    h, w, bb = leaf(hidden), leaf(weight), leaf(b)
    lp, ent = ops.linear_logprobs(h, w, labels, bias=bb, return_entropy=True, backend=backend, chunk_size=4, **tf)
    rh, rw, rb = f64(hidden), f64(weight), f64(b)
    ref_lp, ref_ent = logprobs64(rh, rw, rb, labels, **tf)
    assert close(lp, ref_lp) and close(ent, ref_ent)
    ignored = labels == -100
    assert ignored.any() and (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    g = torch.Generator().manual_seed(2)
    g_lp, g_ent = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    (lp * g_lp.float() + ent * g_ent.float()).sum().backward()
    (ref_lp * g_lp + ref_ent * g_ent).sum().backward()
    check_grads([(h, rh), (w, rw), (bb, rb)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_one_token_tiny_cap(backend):
    # One token, a cap so small that most logits sit at +-softcap / T: the gradient comes through 1 - tanh^2 from
    # ~0.4 down to ~1e-70. It is ill-conditioned in the raw logits x there (d log(1 - tanh^2) / dx = -2 tanh *
    # logit_scale / softcap: an error eps |x| in x becomes 16 eps |x| relative); on inputs of few bits the fp32
    # matmul and the scale logit_scale / softcap = 8 are exact, so what is measured is the tanh and its derivative.
    g = torch.Generator().manual_seed(5)
    hidden = torch.randint(-8, 9, (1, H), generator=g).float() / 4
    weight = torch.randint(-8, 9, (V, H), generator=g).float() / 8
    b = torch.randint(-8, 9, (V,), generator=g).float() / 8
    labels = torch.tensor([5])
    tf = dict(temperature=0.5, logit_scale=4.0, softcap=0.5)
    h, w, bb = leaf(hidden), leaf(weight), leaf(b)
    lp, ent = ops.linear_logprobs(h, w, labels, bias=bb, return_entropy=True, backend=backend, **tf)
    rh, rw, rb = f64(hidden), f64(weight), f64(b)
    ref_lp, ref_ent = logprobs64(rh, rw, rb, labels, **tf)
    arg = (hidden @ weight.T + b) * 8  # the tanh's argument
    assert (arg.abs() > 8).float().mean() > 0.7 and (arg.abs() < 3).sum() >= 3  # mostly saturated, a few not
    assert close(lp, ref_lp) and close(ent, ref_ent)
    (lp + 0.5 * ent).sum().backward()
    (ref_lp + 0.5 * ref_ent).sum().backward()
    check_grads([(h, rh), (w, rw), (bb, rb)], atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_kl_tiny_cap(backend):
    # As above for the KL (three tokens, both heads capped hard; exact fp32 matmuls on few-bit inputs).
    g = torch.Generator().manual_seed(5)
    hidden = torch.randint(-8, 9, (3, H), generator=g).float() / 4
    weight = torch.randint(-8, 9, (V, H), generator=g).float() / 8
    b = torch.randint(-8, 9, (V,), generator=g).float() / 8
    ref_hidden = torch.randint(-8, 9, (3, H), generator=g).float() / 4
    tf = dict(temperature=0.5, logit_scale=4.0, softcap=0.5)
    h, w, bb = leaf(hidden), leaf(weight), leaf(b)
    kl = ops.linear_kl(h, w, ref_hidden, weight, bias=bb, ref_bias=b.flip(0), backend=backend, **tf)
    rh, rw, rb = f64(hidden), f64(weight), f64(b)
    ref = kl64(rh, rw, rb, ref_hidden.double(), weight.double(), b.flip(0).double(), torch.zeros(3, dtype=torch.long), **tf)
    assert close(kl, ref)
    kl.sum().backward()
    ref.sum().backward()
    check_grads([(h, rh), (w, rw), (bb, rb)], atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_linear_kl(backend, case):
    hidden, weight, b, labels, tf = inputs(4, N, case, bias_always=True)
    g = torch.Generator().manual_seed(5)
    ref_hidden = torch.randn(N, HR, generator=g) * CASES[case][4]
    ref_weight = torch.randn(V, HR, generator=g) / HR**0.5
    ref_bias = torch.randn(V, generator=g)
    h, w, bb = leaf(hidden), leaf(weight), leaf(b)
    kl = ops.linear_kl(h, w, ref_hidden, ref_weight, labels, bias=bb, ref_bias=ref_bias, backend=backend, chunk_size=4, **tf)
    rh, rw, rb = f64(hidden), f64(weight), f64(b)
    ref = kl64(rh, rw, rb, ref_hidden.double(), ref_weight.double(), ref_bias.double(), labels, **tf)
    assert close(kl, ref)
    assert (kl[labels == -100] == 0).all()
    g_kl = torch.randn(N, generator=g, dtype=torch.float64)
    (kl * g_kl.float()).sum().backward()
    (ref * g_kl).sum().backward()
    check_grads([(h, rh), (w, rw), (bb, rb)])


def ppo_inputs(case, seed=6):
    hidden, weight, b, labels, tf = inputs(seed, 12, case)
    hidden, labels = hidden.view(3, 4, H), labels.view(3, 4)
    mask = labels != -100
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lp64, _ = logprobs64(hidden.double(), weight.double(), None if b is None else b.double(), labels, **tf)
    # ratios around 1 on both sides of the clip range; masked positions hold garbage that must not matter
    old = (lp64 + 0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64)).float().masked_fill(~mask, 7.0)
    ref_lp = (lp64 + 0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(3, 4, generator=g)
    return hidden, weight, b, labels, mask, old, ref_lp, adv, tf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("importance_ratio", ["token", "sequence"])
def test_linear_ppo_loss(backend, case, importance_ratio):
    hidden, weight, b, labels, mask, old, ref_lp, adv, tf = ppo_inputs(case)
    kw = dict(clip_eps=0.2, loss_agg="seq-mean-token-mean", importance_ratio=importance_ratio)
    h, w, bb = leaf(hidden), leaf(weight), leaf(b)
    loss, stats = ops.linear_ppo_loss(h, w, labels, old, adv, mask, bias=bb, entropy_coef=0.05, ref_logprobs=ref_lp,
                                      kl_coef=0.1, backend=backend, chunk_size=4, **kw, **tf)
    rh, rw, rb = f64(hidden), f64(weight), f64(b)
    lp64, ent64 = logprobs64(rh, rw, rb, torch.where(mask, labels, -100), **tf)
    ref_loss = composed_ppo_loss(lp64, ent64, old.double(), adv.double(), mask, entropy_coef=0.05, ref=ref_lp.double(),
                                 kl_coef=0.1, kl_estimator="k3", **kw)
    assert close(loss, ref_loss) and close(stats["logprobs"], lp64) and close(stats["entropies"], ent64)
    loss.backward()
    ref_loss.backward()
    check_grads([(h, rh), (w, rw), (bb, rb)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_defaults_are_the_untransformed_ops(backend):
    # logit_scale=1, softcap=None, no bias give bit for bit what the calls without them give.
    hidden, weight, _, labels = make_inputs(8, 10, H, V, torch.float32)
    ref_hidden, ref_weight = hidden.flip(0), weight.flip(1)
    mask = labels != -100
    old, adv = torch.full((10,), -4.0), torch.randn(10, generator=torch.Generator().manual_seed(9))
    explicit = dict(logit_scale=1.0, softcap=None, bias=None)
    calls = [
        lambda h, w, **kw: ops.linear_logprobs(h, w, labels, temperature=0.7, return_entropy=True, backend=backend, **kw),
        lambda h, w, **kw: ops.linear_kl(h, w, ref_hidden, ref_weight, labels, temperature=0.7, backend=backend, **kw),
        lambda h, w, **kw: ops.linear_ppo_loss(h, w, labels, old, adv, mask, entropy_coef=0.1, temperature=0.7, backend=backend, **kw),
    ]
    for call in calls:
        outs = []
        for kw in ({}, explicit):
            h, w = leaf(hidden), leaf(weight)
            out = call(h, w, **kw)
            out = list(out) if isinstance(out, tuple) else [out]
            if isinstance(out[-1], dict):
                out = [out[0], out[1]["logprobs"], out[1]["entropies"]]
            sum(o.sum() for o in out if o.requires_grad).backward()
            outs.append([*out, h.grad, w.grad])
        for a, b in zip(*outs):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["logit_scale", "softcap"])
@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, True, "2"])
def test_bad_transform_arguments(name, value):
    hidden, weight, _, labels = make_inputs(10, 4, 8, 11, torch.float32)
    mask = labels != -100
    calls = [
        lambda **kw: ops.linear_logprobs(hidden, weight, labels, backend="torch", **kw),
        lambda **kw: ops.linear_kl(hidden, weight, hidden, weight, labels, backend="torch", **kw),
        lambda **kw: ops.linear_ppo_loss(hidden, weight, labels, torch.zeros(4), torch.ones(4), mask, backend="torch", **kw),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=name):
            call(**{name: value})


def test_bad_biases():
    hidden, weight, b, labels = make_inputs(11, 4, 8, 11, torch.float32, bias=True)
    mask = labels != -100
    with pytest.raises(ValueError, match="ref_bias"):
        ops.linear_kl(hidden, weight, hidden, weight, ref_bias=b[:-1], backend="torch")
    with pytest.raises(TypeError, match="ref_bias"):
        ops.linear_kl(hidden, weight, hidden, weight, ref_bias=b.double(), backend="torch")
    with pytest.raises(ValueError, match="bias"):
        ops.linear_kl(hidden, weight, hidden, weight, bias=b[:-1], backend="torch")
    with pytest.raises(TypeError, match="bias"):
        ops.linear_ppo_loss(hidden, weight, labels, torch.zeros(4), torch.ones(4), mask, bias=b.double(), backend="torch")


if "triton" in BACKENDS:
    import triton
    import triton.language as tl
    from rlhf_fast_kernels._common import softcap_tile

    @triton.jit
    def _softcap_kernel(x_ptr, t_ptr, d_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        t, d = softcap_tile(x, 1.0)
        tl.store(t_ptr + offs, t, mask=offs < n)
        tl.store(d_ptr + offs, d, mask=offs < n)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (the interpreter on CPU)")
def test_triton_softcap_tile_is_accurate_at_every_magnitude():
    # The kernels' exp-based tanh (no libdevice) and 1 - tanh^2 against float64, from 1e-30 to 1e4, both signs,
    # across the switch to the series at |x| = 1/8; no overflow, no NaN.
    mag = torch.tensor([0.0, 1e-30, 1e-8, 1e-3, 0.05, 0.1249, 0.125, 0.1251, 0.3, 0.7, 1.0, 2.0, 5.0, 9.0, 15.0,
                        30.0, 44.0, 80.0, 1e4], dtype=torch.float32)
    x = torch.cat([mag, -mag])
    t, d = torch.empty_like(x), torch.empty_like(x)
    _softcap_kernel[(1,)](x, t, d, x.numel(), BLOCK=64)
    x64 = x.double()
    t64 = torch.tanh(x64)
    d64 = 1.0 / torch.cosh(x64) ** 2
    assert torch.isfinite(t).all() and torch.isfinite(d).all()
    # relative to themselves (d down to fp32's normal range: below it both are denormal-or-zero)
    assert ((t.double() - t64).abs() <= 4e-7 * t64.abs()).all()
    big = d64 > 1e-37
    assert ((d.double() - d64).abs()[big] <= 2e-6 * d64[big]).all()
    assert (d.double()[~big] <= 1e-37).all()

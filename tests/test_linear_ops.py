"""linear_logprobs, linear_kl and linear_ppo_loss on every backend against float64 references on materialized logits."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import backends_for, composed_ppo_loss, f64, leaf, make_inputs, rel_err
from rlhf_fast import ops
from rlhf_fast.ops import reference as R

BACKENDS = backends_for("torch", "triton")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# Interpreted triton is slow: keep its shapes small (the torch backend gets the same ones).
shapes = st.tuples(
    st.integers(1, 2),  # leading dims: [N] or [B, T]
    st.integers(1, 19),  # tokens
    st.sampled_from([3, 16, 67]),  # H (odd and tiny included)
    st.sampled_from([1, 7, 37, 130, 257]),  # V: never a multiple of a power-of-two tile
)


def make(seed, lead, n, h, v, dtype, **kw):
    """Inputs of one hypothesis-drawn shape: [n] tokens, or [2, ceil(n/2)] when lead == 2."""
    return make_inputs(seed, n, h, v, dtype, lead=None if lead == 1 else (2, (n + 1) // 2), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=12, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), bias=st.booleans(), temperature=st.sampled_from([1.0, 0.05, 2.5]))
def test_linear_logprobs_matches_reference(backend, dtype, shape, seed, bias, temperature):
    hidden, weight, b, labels = make(seed, *shape, dtype, bias=bias)
    h, w, bb = leaf(hidden), leaf(weight), leaf(b)
    logprobs, entropy = ops.linear_logprobs(h, w, labels, bias=bb, temperature=temperature, return_entropy=True, backend=backend, chunk_size=4)
    rh, rw, rb = f64(hidden), f64(weight), f64(b)
    ref_lp, ref_ent = R.linear_logprobs(rh, rw, labels, rb, temperature, return_entropy=True)
    assert logprobs.dtype == entropy.dtype == torch.float32 and logprobs.shape == labels.shape
    tol = TOL[dtype]
    # fp32 logits carry ~eps * |z| absolute error, and |z| grows as 1/temperature: near-zero outputs are judged
    # against that floor (tol / temperature nats per token), not their own tiny size.
    floor = labels.numel() ** 0.5 / temperature
    assert rel_err(logprobs, ref_lp, atol=floor) <= tol
    assert rel_err(entropy, ref_ent, atol=floor) <= tol
    ignored = labels == -100
    assert (logprobs[ignored] == 0).all() and (entropy[ignored] == 0).all()

    g_lp, g_ent = torch.randn_like(ref_lp), torch.randn_like(ref_ent)
    (logprobs * g_lp.float() + entropy * g_ent.float()).sum().backward()
    (ref_lp * g_lp + ref_ent * g_ent).sum().backward()
    for ours, ref in ((h, rh), (w, rw), (bb, rb)):
        if ours is not None:
            assert ours.grad.dtype == dtype
            assert rel_err(ours.grad, ref.grad, atol=floor) <= 2 * tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_only_logprobs_has_gradients(backend):
    hidden, weight, _, labels = make(1, 2, 9, 16, 37, torch.float32)
    h, w = leaf(hidden), leaf(weight)
    out = ops.linear_logprobs(h, w, labels, backend=backend)
    assert isinstance(out, torch.Tensor)
    out.sum().backward()
    rh, rw = f64(hidden), f64(weight)
    R.linear_logprobs(rh, rw, labels).sum().backward()
    assert rel_err(h.grad, rh.grad) <= 1e-5 and rel_err(w.grad, rw.grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_logits_and_tiny_temperature(backend, dtype):
    # |z| ~ 1e4 (and 1e4 / 0.01 after temperature): a naive exp overflows; log-sum-exp must not.
    hidden, weight, _, labels = make(2, 1, 11, 16, 130, dtype, ignore_frac=0.0)
    hidden = (hidden.float() * 2500).to(dtype)
    for temperature in (1.0, 0.01):
        lp, ent = ops.linear_logprobs(hidden, weight, labels, temperature=temperature, return_entropy=True, backend=backend)
        ref_lp, ref_ent = R.linear_logprobs(f64(hidden), f64(weight), labels, None, temperature, return_entropy=True)
        assert ref_lp.abs().max() > 1e3  # the case really is extreme
        assert rel_err(lp, ref_lp) <= TOL[dtype]
        assert (ent - ref_ent.float()).abs().max() <= 1e-3 and (ent >= -1e-6).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zeros_and_no_gradient(backend):
    hidden, weight, b, labels = make(3, 2, 6, 3, 37, torch.float32, bias=True)
    labels[:] = -100
    h, w, bb = leaf(hidden), leaf(weight), leaf(b)
    lp, ent = ops.linear_logprobs(h, w, labels, bias=bb, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    for t in (lp, ent, h.grad, w.grad, bb.grad):
        assert (t == 0).all()


def test_chunk_size_does_not_change_the_result():
    hidden, weight, _, labels = make(4, 1, 19, 16, 130, torch.float32)
    outs = [ops.linear_logprobs(hidden, weight, labels, backend="torch", chunk_size=c, return_entropy=True) for c in (1, 5, 19, 1000)]
    for lp, ent in outs[1:]:
        assert rel_err(lp, outs[0][0]) <= 1e-6 and rel_err(ent, outs[0][1]) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=8, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), temperature=st.sampled_from([1.0, 0.3]), use_labels=st.booleans())
def test_linear_kl_matches_reference(backend, dtype, shape, seed, temperature, use_labels):
    hidden, weight, _, labels = make(seed, *shape, dtype)
    ref_hidden = (hidden.float() + 0.5 * torch.randn(hidden.shape)).to(dtype)
    ref_weight = (weight.float() + 0.1 * torch.randn(weight.shape)).to(dtype)
    labels = labels if use_labels else None
    h, w = leaf(hidden), leaf(weight)
    kl = ops.linear_kl(h, w, ref_hidden, ref_weight, labels, temperature=temperature, backend=backend, chunk_size=3)
    rh, rw = f64(hidden), f64(weight)
    ref = R.linear_kl(rh, rw, f64(ref_hidden), f64(ref_weight), labels, temperature)
    assert kl.dtype == torch.float32 and kl.shape == hidden.shape[:-1]
    # KL is a difference of nearly equal terms: judge it against the scale of the terms as well.
    assert rel_err(kl, ref, atol=1e-4) <= 10 * TOL[dtype]
    g = torch.randn_like(ref)
    (kl * g.float()).sum().backward()
    (ref * g).sum().backward()
    # A low-precision weight makes the backward recompute the logits in another tiling: fp32 rounding of z leaves
    # ~1e-6 gradients where the exact ones are 0 (V = 1, where both heads give probability 1: measured norm 4e-6).
    atol = 1e-4 if dtype == torch.float32 else 1e-3
    assert rel_err(h.grad, rh.grad, atol=atol) <= 10 * TOL[dtype]
    assert rel_err(w.grad, rw.grad, atol=atol) <= 10 * TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_kl_one_word_vocabulary(backend):
    """V = 1: both heads give probability 1, so the KL and its gradients are 0 (bf16: to fp32 rounding of the logits)."""
    for dtype, tol in ((torch.float32, 0.0), (torch.bfloat16, 1e-5)):
        hidden, weight, _, _ = make_inputs(1048577, 13, 67, 1, dtype)
        h, w = leaf(hidden), leaf(weight)
        kl = ops.linear_kl(h, w, (hidden.float() + 0.5).to(dtype), (weight.float() + 0.1).to(dtype), None, temperature=0.3,
                           backend=backend, chunk_size=3)
        (kl * torch.randn_like(kl)).sum().backward()
        assert kl.abs().max() == 0 and h.grad.abs().max() <= tol and w.grad.abs().max() <= tol  # measured bf16: 1.6e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_kl_of_identical_policies_is_zero(backend):
    hidden, weight, _, _ = make(5, 1, 8, 16, 37, torch.float32)
    kl = ops.linear_kl(hidden, weight, hidden.clone(), weight.clone(), backend=backend)
    assert kl.abs().max() <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), tokens=st.integers(1, 8), vocab=st.sampled_from([7, 37, 130]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       clip=st.sampled_from([{}, {"clip_eps_high": 0.28}, {"dual_clip": 3.0}]), entropy_coef=st.sampled_from([0.0, 0.01]),
       kl=st.sampled_from([(0.0, "k3"), (0.1, "k1"), (0.05, "k3"), (0.2, "k2")]))
def test_linear_ppo_loss_equals_composed_ops(backend, loss_agg, seed, tokens, vocab, dtype, clip, entropy_coef, kl):
    g = torch.Generator().manual_seed(seed)
    B, H = 3, 16
    hidden = torch.randn(B, tokens, H, generator=g).to(dtype)
    weight = torch.randn(vocab, H, generator=g).div(4).to(dtype)
    labels = torch.randint(0, vocab, (B, tokens), generator=g)
    mask = torch.rand(B, tokens, generator=g) > 0.3
    mask[-1] = False  # a fully masked row
    with torch.no_grad():
        base = R.linear_logprobs(hidden.double(), weight.double(), labels)
    old = (base + 0.3 * torch.randn(B, tokens, generator=g, dtype=torch.float64)).float()  # ratios on both sides of the clip
    ref = (base + 0.3 * torch.randn(B, tokens, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, tokens, generator=g)
    kl_coef, kl_estimator = kl
    kw = dict(entropy_coef=entropy_coef, kl_coef=kl_coef, kl_estimator=kl_estimator, loss_agg=loss_agg, **clip)

    h, w = leaf(hidden), leaf(weight)
    loss, stats = ops.linear_ppo_loss(h, w, labels, old, adv, mask, ref_logprobs=ref, backend=backend, chunk_size=2, **kw)
    (3.0 * loss).backward()

    rh, rw = f64(hidden), f64(weight)
    lp, ent = R.linear_logprobs(rh, rw, torch.where(mask, labels, -100), return_entropy=True)
    ref_loss = composed_ppo_loss(lp, ent, old.double(), adv.double(), mask, ref=ref.double(), **kw)
    (3.0 * ref_loss).backward()
    tol = TOL[dtype]
    # per-token terms are O(1) (advantages ~ N(0, 1), ratios ~ 1) and may cancel: judge against that scale
    assert abs(loss.item() - ref_loss.item()) <= tol * (abs(ref_loss.item()) + 1.0)
    assert rel_err(h.grad, rh.grad, atol=1e-6) <= 2 * tol and rel_err(w.grad, rw.grad, atol=1e-6) <= 2 * tol
    assert rel_err(stats["logprobs"], lp * mask) <= tol
    _, ref_stats = ops.ppo_policy_loss(lp.detach(), old.double(), adv.double(), mask, **clip)
    for k in ref_stats:
        assert abs(stats[k].item() - ref_stats[k].item()) <= 1e-2 * (1 + abs(ref_stats[k].item())), k

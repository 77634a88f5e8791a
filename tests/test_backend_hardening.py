"""The backends' edges: -inf logits, autocast, hidden and weight of different dtypes, no fp32 copy of a bf16 head,
no gradient work without autograd, the matmul's bucketed autotune key, and the pure forward / backward functions.

Every reference is written here from the definition, in float64 on materialized logits: log p = z - logsumexp over
the finite logits, p = 0 and log p = -inf at a -inf logit, 0 log 0 = 0, KL = +inf where p > 0 meets q = 0; a row
of all -inf logits has log-probs -inf (d logp/dz = onehot - p = onehot), entropy 0. Triton runs in the interpreter on
CPU (conftest): tiny shapes; on CUDA where present.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import backends_for
from rlhf_fast import ops
from rlhf_fast.ops import _torch
from rlhf_fast.ops import reference as R

BACKENDS = backends_for("torch", "triton")
# (backend, device): CPU tensors (triton through the interpreter), and CUDA ones where a GPU is present
CASES = [(b, "cpu") for b in BACKENDS] + [(b, "cuda") for b in ("torch", "triton")
                                         if torch.cuda.is_available() and b in ops.available_backends()]
INF = float("inf")
# fp32 math against float64, relative to the quantity's norm: largest measured 7e-7 (a gradient), 2e-7 on values
TOL = 3e-6


def tol(device):
    return TOL if device == "cpu" else 10 * TOL  # GPU: other summation orders


def backend_module(name):
    if name == "torch":
        return _torch
    from rlhf_fast.ops import _triton

    return _triton


def make(seed, n, h, v, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).mul(2.0).to(dtype).to(device)
    weight = torch.randn(v, h, generator=g).div(h**0.5).to(dtype).to(device)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, weight, labels


def vocab(device):
    """V with a -inf run (see neginf_bias) that covers whole vocabulary tiles and splits: 32 / 96 columns under the
    interpreter, 256 on a GPU."""
    return 257 if device == "cpu" else 1100


def neginf_bias(v, device="cpu", seed=0):
    """A bias with -inf on [80, V - 57) (V = 257: [80, 200), covering the interpreter's middle vocabulary split
    [96, 192) whole; V = 1100: the GPU's splits [256, 768)), and at a few single tokens, token 0 among them (the
    stand-in label of ignored rows)."""
    b = torch.randn(v, generator=torch.Generator().manual_seed(seed))
    b[80:v - 57] = -INF
    b[[0, 3, 17, v - 27]] = -INF
    return b.to(device)


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


# ---- float64 definitions --------------------------------------------------------------------------------------

def logits64(hidden, weight, bias=None, temperature=1.0):
    z = hidden.double().cpu() @ weight.double().cpu().T
    if bias is not None:
        z = z + bias.double().cpu()
    return z / temperature


def dist64(z):
    """(log p, p) of each row of final logits z [N, V]: over the finite logits; -inf and 0 at -inf logits."""
    logp = torch.full_like(z, -INF)
    for i, row in enumerate(z):
        finite = row > -INF
        if finite.any():
            logp[i, finite] = row[finite] - torch.logsumexp(row[finite], 0)
    return logp, logp.exp()


def logprobs64(z, labels, ignore_index=-100):
    """(log-probs, entropy, log p, p), 0 at ignored rows."""
    labels = labels.cpu()
    logp, p = dist64(z)
    valid = labels != ignore_index
    lp = logp.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    ent = -torch.where(p > 0, p * logp, 0.0).sum(1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0), logp, p


def logprobs_dz64(z, labels, g_lp, g_ent, ignore_index=-100):
    """d(g_lp . logprob + g_ent . entropy)/dz = g_lp (onehot - p) - g_ent p (log p + H); 0 from ignored rows."""
    labels = labels.cpu()
    _, ent, logp, p = logprobs64(z, labels, ignore_index)
    valid = labels != ignore_index
    g_lp, g_ent = g_lp.double().cpu() * valid, g_ent.double().cpu() * valid
    onehot = torch.zeros_like(z).scatter_(1, torch.where(valid, labels, 0)[:, None], 1.0)
    dz = g_lp[:, None] * (onehot - p)
    return dz - g_ent[:, None] * torch.where(p > 0, p * (logp + ent[:, None]), 0.0)


def kl64(z, zr, valid=None):
    """(KL(p || q) per row, dKL/dz per row-unit upstream gradient): +inf (and no gradient) where p > 0 meets q = 0."""
    logp, p = dist64(z)
    logq, q = dist64(zr)
    kl, dz = torch.zeros(z.shape[0], dtype=torch.float64), torch.zeros_like(z)
    for i in range(z.shape[0]):
        pos = p[i] > 0
        if (pos & (q[i] == 0)).any():
            kl[i] = INF
            continue
        kl[i] = (p[i, pos] * (logp[i, pos] - logq[i, pos])).sum()
        dz[i, pos] = p[i, pos] * (logp[i, pos] - logq[i, pos] - kl[i])
    if valid is not None:
        kl, dz = torch.where(valid.cpu(), kl, 0.0), dz * valid.cpu()[:, None]
    return kl, dz


def head_grads64(dz, hidden, weight, temperature=1.0):
    """(dhidden, dweight, dbias) for z = (hidden @ weight.T + bias) / temperature."""
    dx = dz / temperature
    return dx @ weight.double().cpu(), dx.T @ hidden.double().cpu(), dx.sum(0)


def assert_close(out, ref, tol=TOL, what=""):
    """Same infinities, no NaN, and ||finite part - ref|| <= tol ||ref|| (+ 1e-7 for all-zero references)."""
    out = out.detach().double().cpu()
    assert out.shape == ref.shape, what
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(out), inf) and torch.equal(out[inf], ref[inf]), what
    assert not out.isnan().any(), what
    err = (out[~inf] - ref[~inf]).norm().item()
    assert err <= tol * (ref[~inf].norm().item() + 1e-7), (what, err, ref[~inf].norm().item())


def assert_grads(pairs, tol=TOL):
    for name, ours, ref in pairs:
        assert ours is not None, name
        assert_close(ours, ref, tol, name)


# ---- 1. -inf logits ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", CASES)
def test_neginf_logits_logprobs_and_entropy(backend, device):
    n, h, v, temperature = 13, 16, vocab(device), 0.7
    hidden, weight, labels = make(1, n, h, v, device=device)
    bias = neginf_bias(v, device)
    labels[0], labels[5], labels[9] = 100, 3, v - 27  # labels whose logit is -inf
    labels[[2, 7]] = -100
    hl, wl, bl = leaf(hidden), leaf(weight), leaf(bias)
    lp, ent = ops.linear_logprobs(hl, wl, labels, bias=bl, temperature=temperature, return_entropy=True,
                                  backend=backend, chunk_size=4)
    z = logits64(hidden, weight, bias, temperature)
    ref_lp, ref_ent, _, _ = logprobs64(z, labels)
    assert ref_lp[[0, 5, 9]].eq(-INF).all() and ref_lp[[2, 7]].eq(0).all()
    assert_close(lp, ref_lp, tol(device), "logprobs")
    assert_close(ent, ref_ent, tol(device), "entropy")

    g = torch.Generator().manual_seed(2)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    torch.autograd.backward([lp, ent], [g_lp.to(device), g_ent.to(device)])
    dh, dw, db = head_grads64(logprobs_dz64(z, labels, g_lp, g_ent), hidden, weight, temperature)
    assert_grads([("hidden", hl.grad, dh), ("weight", wl.grad, dw), ("bias", bl.grad, db)], tol(device))


@pytest.mark.parametrize("backend,device", CASES)
def test_rows_of_all_neginf_logits(backend, device):
    # No distribution: log-prob -inf, entropy 0, d logp/dz = onehot (p = 0), KL 0 from such a policy, KL +inf
    # (no gradient) against such a reference.
    n, h, v = 6, 16, 130
    hidden, weight, labels = make(3, n, h, v, device=device)
    labels[4] = -100
    dead = torch.full((v,), -INF, device=device)
    hl, wl, bl = leaf(hidden), leaf(weight), leaf(dead)
    lp, ent = ops.linear_logprobs(hl, wl, labels, bias=bl, return_entropy=True, backend=backend, chunk_size=4)
    valid = labels != -100
    assert torch.equal(lp, torch.where(valid, -INF, 0.0)) and torch.equal(ent, torch.zeros_like(ent))
    g = torch.randn(n, generator=torch.Generator().manual_seed(4))
    torch.autograd.backward([lp, ent], [g.to(device), torch.ones_like(ent)])
    valid = valid.cpu()
    onehot = torch.zeros(n, v, dtype=torch.float64).scatter_(1, torch.where(valid, labels.cpu(), 0)[:, None], 1.0)
    dh, dw, db = head_grads64(g.double()[:, None] * valid[:, None] * onehot, hidden, weight)
    assert_grads([("hidden", hl.grad, dh), ("weight", wl.grad, dw), ("bias", bl.grad, db)], tol(device))

    ref_hidden, ref_weight, _ = make(4, n, h, v, device=device)
    for bias, ref_bias, want in ((dead, None, 0.0), (None, dead, INF)):
        hl, wl = leaf(hidden), leaf(weight)
        kl = ops.linear_kl(hl, wl, ref_hidden, ref_weight, labels, bias=bias, ref_bias=ref_bias, backend=backend,
                           chunk_size=4)
        assert torch.equal(kl.cpu(), torch.where(valid, want, 0.0))
        kl.backward(torch.ones_like(kl))
        assert torch.equal(hl.grad, torch.zeros_like(hidden)) and torch.equal(wl.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend,device", CASES)
def test_neginf_logits_kl(backend, device):
    n, h, v, temperature = 11, 16, vocab(device), 1.3
    hidden, weight, labels = make(5, n, h, v, device=device)
    ref_hidden, ref_weight, _ = make(6, n, h, v, device=device)
    labels[3] = -100
    bias = neginf_bias(v, device)
    ref_bias = torch.randn(v, generator=torch.Generator().manual_seed(7))
    ref_bias[100:190] = -INF  # within the policy's -inf run: q = 0 only where p = 0, KL finite
    ref_bias[[3, 40]] = -INF  # 40: q = 0 where p > 0 (for the second half)
    ref_bias = ref_bias.to(device)
    valid = labels != -100
    g = torch.randn(n, generator=torch.Generator().manual_seed(8))
    for rb, finite in ((torch.where(torch.arange(v, device=device) == 40, 0.5, ref_bias), True), (ref_bias, False)):
        hl, wl, bl = leaf(hidden), leaf(weight), leaf(bias)
        kl = ops.linear_kl(hl, wl, ref_hidden, ref_weight, labels, bias=bl, ref_bias=rb, temperature=temperature,
                           backend=backend, chunk_size=3)
        ref, dz = kl64(logits64(hidden, weight, bias, temperature), logits64(ref_hidden, ref_weight, rb, temperature), valid)
        assert bool(torch.isfinite(ref).all()) == finite
        assert_close(kl, ref, tol(device), "kl")
        kl.backward(g.to(device))
        dh, dw, db = head_grads64(dz * g.double()[:, None], hidden, weight, temperature)
        assert_grads([("hidden", hl.grad, dh), ("weight", wl.grad, dw), ("bias", bl.grad, db)], tol(device))


@pytest.mark.parametrize("backend,device", CASES)
def test_neginf_logits_ppo_loss(backend, device):
    # Forbidden tokens (bias -inf) in the single-pass loss: entropy bonus and gradients stay finite and exact.
    B, T, h, v, eps, coef = 2, 7, 16, vocab(device), 0.2, 0.01
    hidden, weight, labels = make(9, B * T, h, v)
    bias = neginf_bias(v)
    labels = torch.where(torch.isinf(bias)[labels], v - 10, labels)  # labels on allowed tokens
    mask = torch.rand(B * T, generator=torch.Generator().manual_seed(10)) > 0.25
    z = logits64(hidden, weight, bias)
    lp64, ent64, _, _ = logprobs64(z, torch.where(mask, labels, -100))
    g = torch.Generator().manual_seed(11)
    old = (lp64 + 0.3 * torch.randn(B * T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B * T, generator=g)
    hl, wl, bl = leaf(hidden.view(B, T, h).to(device)), leaf(weight.to(device)), leaf(bias.to(device))
    loss, _ = ops.linear_ppo_loss(hl, wl, *(x.view(B, T).to(device) for x in (labels, old, adv, mask)),
                                  bias=bl, clip_eps=eps, entropy_coef=coef, backend=backend, chunk_size=4)
    loss.backward()

    lp, ent = lp64.clone().requires_grad_(), ent64.clone().requires_grad_()
    ratio = torch.exp(lp - old.double())
    a = adv.double()
    per_token = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps)) - coef * ent
    ref_loss = (per_token * mask).sum() / mask.sum()  # token-mean
    g_lp, g_ent = torch.autograd.grad(ref_loss, [lp, ent])
    assert abs(loss.item() - ref_loss.item()) <= tol(device) * (abs(ref_loss.item()) + 1.0)
    dh, dw, db = head_grads64(logprobs_dz64(z, torch.where(mask, labels, -100), g_lp, g_ent), hidden, weight)
    assert_grads([("hidden", hl.grad.view(B * T, h), dh), ("weight", wl.grad, dw), ("bias", bl.grad, db)], tol(device))


def test_reference_follows_the_neginf_convention():
    # rlhf_fast.ops.reference (the naive path and other tests' oracle) agrees with the definition, gradients included.
    n, h, v = 9, 16, 257
    hidden, weight, labels = make(12, n, h, v)
    ref_hidden, ref_weight, _ = make(13, n, h, v)
    labels[0], labels[4] = 3, -100
    bias = neginf_bias(v)
    policy_bias = torch.where(torch.arange(v) < 100, 0.0, bias)  # finite on [0, 100), as ``bias`` from 100 on
    g_lp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    for b in (bias, torch.full((v,), -INF)):
        hl, wl, bl = hidden.double().requires_grad_(), weight.double().requires_grad_(), b.double().requires_grad_()
        lp, ent = R.linear_logprobs(hl, wl, labels, bl, return_entropy=True)
        z = logits64(hidden, weight, b)
        ref_lp, ref_ent, _, _ = logprobs64(z, labels)
        assert_close(lp, ref_lp, 1e-12)
        assert_close(ent, ref_ent, 1e-12)
        torch.autograd.backward([lp, ent], [g_lp, g_ent])
        dh, dw, db = head_grads64(logprobs_dz64(z, labels, g_lp, g_ent), hidden, weight)
        assert_grads([("hidden", hl.grad, dh), ("weight", wl.grad, dw), ("bias", bl.grad, db)], 1e-12)
    # against ``bias``: q = 0 where p > 0 (tokens 0, 3, 17, [80, 100)), KL = +inf at every row; against itself: finite
    for rb in (bias, policy_bias):
        hl, wl = hidden.double().requires_grad_(), weight.double().requires_grad_()
        kl = R.linear_kl(hl, wl, ref_hidden.double(), ref_weight.double(), labels, bias=policy_bias.double(),
                         ref_bias=rb.double())
        ref, dz = kl64(logits64(hidden, weight, policy_bias), logits64(ref_hidden, ref_weight, rb), labels != -100)
        assert_close(kl, ref, 1e-12)
        kl.backward(g_lp)
        dh, dw, _ = head_grads64(dz * g_lp[:, None], hidden, weight)
        assert_grads([("hidden", hl.grad, dh), ("weight", wl.grad, dw)], 1e-12)


# ---- 2. autocast --------------------------------------------------------------------------------------------------

def _all_ops(backend, device, fwd_autocast, bwd_autocast):
    """Values and gradients of linear_logprobs (+ entropy), linear_kl and linear_ppo_loss on fixed fp32 inputs,
    forward and backward each under bf16 autocast or not."""
    n, h, v = 10, 16, 130
    hidden, weight, labels = make(14, n, h, v, device=device)
    ref_hidden, ref_weight, _ = make(15, n, h, v, device=device)
    bias = torch.randn(v, generator=torch.Generator().manual_seed(16)).to(device)
    mask = labels % 3 != 0
    old = torch.full((n,), -4.0, device=device)
    adv = torch.linspace(-1, 1, n, device=device)
    out = []
    for op in ("logprobs", "kl", "ppo"):
        hl, wl, bl = leaf(hidden), leaf(weight), leaf(bias)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=fwd_autocast):
            if op == "logprobs":
                vals = ops.linear_logprobs(hl, wl, labels, bias=bl, return_entropy=True, backend=backend, chunk_size=4)
            elif op == "kl":
                vals = (ops.linear_kl(hl, wl, ref_hidden, ref_weight, bias=bl, backend=backend, chunk_size=4),)
            else:
                vals = (ops.linear_ppo_loss(hl, wl, labels, old, adv, mask, bias=bl, entropy_coef=0.01, backend=backend,
                                            chunk_size=4)[0],)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bwd_autocast):
            torch.autograd.backward(vals, [torch.linspace(0.5, 1.5, x.numel(), device=device).view(x.shape) for x in vals])
        out += [*vals, hl.grad, wl.grad, bl.grad]
    return out


@pytest.mark.parametrize("backend,device", CASES)
def test_results_do_not_depend_on_autocast(backend, device):
    base = _all_ops(backend, device, False, False)
    assert all(x.dtype == torch.float32 for x in base)
    for fwd, bwd in ((True, True), (True, False), (False, True)):
        for got, want in zip(_all_ops(backend, device, fwd, bwd), base):
            assert got.dtype == torch.float32
            assert (got - want).norm() <= 1e-6 * want.norm(), (fwd, bwd)


# ---- 3. hidden and weight of different dtypes -----------------------------------------------------------------

@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("h_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_mixed_hidden_and_weight_dtypes(backend, device, h_dtype, w_dtype):
    # e.g. bf16 hidden states with an fp32 LM head (TRL's cast_lm_head_to_fp32): fp32 math on the inputs as given,
    # each gradient in its input's dtype. References from the same (rounded) inputs.
    mod = backend_module(backend)
    n, h, v, temperature = 11, 16, 130, 0.8
    hidden, weight, labels = make(17, n, h, v, h_dtype, device)
    weight = weight.to(w_dtype)
    bias = torch.randn(v, generator=torch.Generator().manual_seed(18)).to(w_dtype).to(device)
    ref_hidden, ref_weight, _ = make(19, n, h, v, h_dtype, device)
    labels[2] = -100
    valid = labels != -100
    tf = _torch.Transform.of(temperature)
    z = logits64(hidden, weight, bias, temperature)
    # values are fp32; gradients in bf16 come back rounded (at most 2^-9 relative each; 1.8e-3 measured)
    tols = {torch.float32: tol(device), torch.bfloat16: 4e-3}
    g_lp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    g_lp_d, g_ent_d = g_lp.float().to(device), g_ent.float().to(device)

    def check_grads(grads, dz):
        for name, got, want, like in zip(("hidden", "weight", "bias"), grads, head_grads64(dz, hidden, weight, temperature),
                                         (hidden, weight, bias)):
            assert got.dtype == like.dtype, name
            assert_close(got, want, tols[like.dtype], name)

    lp, ent, stats = mod.logprobs_fwd(hidden, weight, bias, labels, tf, -100, True, 4)
    ref_lp, ref_ent, _, _ = logprobs64(z, labels)
    assert_close(lp, ref_lp, tol(device), "logprobs")
    assert_close(ent, ref_ent, tol(device), "entropy")
    check_grads(mod.logprobs_bwd(g_lp_d, g_ent_d, hidden, weight, bias, labels, stats, ent, tf, -100, 4, (True,) * 3),
                logprobs_dz64(z, labels, g_lp, g_ent))

    kl, stats = mod.kl_fwd(hidden, weight, bias, ref_hidden, ref_weight, None, valid, tf, 4)
    ref_kl, dz = kl64(z, logits64(ref_hidden, ref_weight, None, temperature), valid)
    assert_close(kl, ref_kl, tol(device), "kl")
    check_grads(mod.kl_bwd(g_lp_d, hidden, weight, bias, ref_hidden, ref_weight, None, valid, kl, stats, tf, 4,
                           (True,) * 3), dz * g_lp[:, None])

    loss, lp, ent, *grads = mod.fused_loss_fwd(hidden, weight, bias, labels, tf, -100,
                                               _linear_token_loss(g_lp_d, g_ent_d), True, 4, (True,) * 3)
    assert_close(lp, ref_lp, tol(device), "fused logprobs")
    assert abs(loss.item() - ((g_lp * ref_lp).sum() + (g_ent * ref_ent).sum()).item()) <= tol(device) * n
    check_grads(grads, logprobs_dz64(z, labels, g_lp, g_ent))


def _linear_token_loss(g_lp, g_ent):
    """token_loss_fn with dloss/dlogprob = g_lp, dloss/dentropy = g_ent (per token)."""
    return lambda lp, ent, s, e: (g_lp[s:e].float() * lp).sum() + (g_ent[s:e].float() * ent).sum()


# ---- 4. no fp32 copy of a bf16 head --------------------------------------------------------------------------------

class _Fp32Tensors(TorchDispatchMode):
    """Records the size (elements) of every fp32 tensor that an op returns, forward and backward."""

    def __init__(self):
        super().__init__()
        self.sizes = [0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sizes += [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.dtype == torch.float32]
        return out


def test_bf16_head_is_cast_block_by_block():
    # The torch backend casts a bf16 head to fp32 one vocabulary block at a time, and writes each dweight block once:
    # no fp32 tensor of the head's size exists, in forward or backward; results as exact as fp32 math allows.
    n, h, v, chunk = 16, 64, 257, 4
    hidden, weight, labels = make(20, n, h, v, torch.bfloat16)
    ref_hidden, ref_weight, _ = make(21, n, h, v, torch.bfloat16)
    bias = torch.randn(v, generator=torch.Generator().manual_seed(22)).to(torch.bfloat16)
    labels[1] = -100
    g_lp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    z = logits64(hidden, weight, bias)
    with _Fp32Tensors() as seen:
        hl, wl, bl = leaf(hidden), leaf(weight), leaf(bias)
        lp, ent = ops.linear_logprobs(hl, wl, labels, bias=bl, return_entropy=True, backend="torch", chunk_size=chunk)
        torch.autograd.backward([lp, ent], [g_lp.float(), g_ent.float()])
        hk, wk = leaf(hidden), leaf(weight)
        kl = ops.linear_kl(hk, wk, ref_hidden, ref_weight, backend="torch", chunk_size=chunk)
        kl.backward(g_lp.float())
    assert max(seen.sizes) < v * h // 4, max(seen.sizes)  # the largest: an [n, V] logits chunk or a [block, H] block

    ref_lp, ref_ent, _, _ = logprobs64(z, labels)
    assert_close(lp, ref_lp, what="logprobs")
    assert_close(ent, ref_ent, what="entropy")
    refs = head_grads64(logprobs_dz64(z, labels, g_lp, g_ent), hidden, weight)
    assert_grads(zip(("hidden", "weight", "bias"), (hl.grad, wl.grad, bl.grad), refs), 4e-3)  # rounded to bf16
    ref_kl, dz = kl64(logits64(hidden, weight), logits64(ref_hidden, ref_weight))
    assert_close(kl, ref_kl, what="kl")
    refs = head_grads64(dz * g_lp[:, None], hidden, weight)
    assert_grads(zip(("hidden", "weight"), (hk.grad, wk.grad), refs[:2]), 4e-3)


# ---- 5. no gradient work without autograd --------------------------------------------------------------------------

class _Matmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in ("mm", "addmm", "addmm_", "bmm", "matmul")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend,device", CASES)
def test_no_grad_ppo_loss_does_no_gradient_work(backend, device):
    n, h, v = 12, 16, 130
    hidden, weight, labels = make(23, n, h, v, device=device)
    mask = labels % 4 != 0
    old, adv = torch.full((n,), -4.0, device=device), torch.linspace(-1, 1, n, device=device)
    hl, wl = leaf(hidden), leaf(weight)
    results = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad), _Matmuls() as mm:
            loss, stats = ops.linear_ppo_loss(hl, wl, labels, old, adv, mask, entropy_coef=0.01, backend=backend,
                                              chunk_size=4)
        results.append((loss, stats["logprobs"], stats["entropies"], mm.count))
    (loss, lp, ent, grad_mms), (loss0, lp0, ent0, eval_mms) = results
    assert not loss0.requires_grad and loss.requires_grad
    assert torch.equal(loss0, loss.detach()) and torch.equal(lp0, lp) and torch.equal(ent0, ent)
    # 3 matmul passes with gradients (logits, dhidden, dweight), only the logits' without
    assert 3 * eval_mms <= grad_mms, (eval_mms, grad_mms)


# ---- 6. the matmul's autotune key -----------------------------------------------------------------------------------

@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (a GPU or TRITON_INTERPRET=1)")
def test_matmul_autotune_key_buckets_the_token_count():
    from rlhf_fast_kernels.matmul import _matmul_acc_kernel, matmul_acc

    # M, N, K: one is a token count (dhidden: M; dweight: K), new at every call; an exact key would re-tune each time
    assert not {"M", "N", "K"} & set(_matmul_acc_kernel.keys)
    g = torch.Generator().manual_seed(24)
    for tokens in (9, 13):
        for shape in ((tokens, 40, 24), (24, 40, tokens)):  # (M, K, N): as dhidden += dz @ W, dW += dz.T @ h
            a = torch.randn(shape[0], shape[1], generator=g)
            b = torch.randn(shape[1], shape[2], generator=g).to(torch.bfloat16)
            c = torch.randn(shape[0], shape[2], generator=g)
            want = c.double() + a.double() @ b.double()
            assert (matmul_acc(c, a, b).double() - want).norm() <= 1e-6 * want.norm()


# ---- 7. the pure forward / backward functions -----------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("n", [1, 13])
def test_pure_functions(backend, device, n):
    # Called directly, in grad mode with inputs that require grad: values and gradients from the definition, and no
    # autograd graph (a custom op runs them).
    mod = backend_module(backend)
    h, v, temperature, t = 16, 257, 1.5, tol(device)
    hidden, weight, labels = make(25 + n, n, h, v, device=device)
    ref_hidden, ref_weight, _ = make(26 + n, n, h, v, device=device)
    bias = torch.randn(v, generator=torch.Generator().manual_seed(27)).to(device)
    ref_bias = torch.randn(v, generator=torch.Generator().manual_seed(28)).to(device)
    if n > 1:
        labels[[1, 5]] = -100
    valid = labels != -100
    hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()
    tf = _torch.Transform.of(temperature)
    z = logits64(hidden, weight, bias, temperature)
    g_lp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    g_lp_d, g_ent_d = g_lp.float().to(device), g_ent.float().to(device)
    names = ("hidden", "weight", "bias")

    lp, ent, stats = mod.logprobs_fwd(hidden, weight, bias, labels, tf, -100, True, 4)
    assert stats.shape[0] == n and stats.dtype == torch.float32 and stats.dim() == 2
    ref_lp, ref_ent, _, _ = logprobs64(z, labels)
    assert_close(lp, ref_lp, t, "logprobs")
    assert_close(ent, ref_ent, t, "entropy")
    grads = mod.logprobs_bwd(g_lp_d, g_ent_d, hidden, weight, bias, labels, stats, ent, tf, -100, 4, (True,) * 3)
    assert_grads(zip(names, grads, head_grads64(logprobs_dz64(z, labels, g_lp, g_ent), hidden, weight, temperature)), t)
    # g_ent None (no entropy gradient), g_lp None (none at all); only dhidden asked for
    dh, dw, db = mod.logprobs_bwd(g_lp_d, None, hidden, weight, bias, labels, stats, ent, tf, -100, 4, (True, False, False))
    assert dw is None and db is None
    assert_close(dh, head_grads64(logprobs_dz64(z, labels, g_lp, 0 * g_ent), hidden, weight, temperature)[0], t, "dh")
    dh, _, _ = mod.logprobs_bwd(None, g_ent_d, hidden, weight, bias, labels, stats, ent, tf, -100, 4, (True, False, False))
    assert_close(dh, head_grads64(logprobs_dz64(z, labels, 0 * g_lp, g_ent), hidden, weight, temperature)[0], t, "dh")

    kl, kl_stats = mod.kl_fwd(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, tf, 4)
    ref_kl, dz = kl64(z, logits64(ref_hidden, ref_weight, ref_bias, temperature), valid)
    assert_close(kl, ref_kl, t, "kl")
    kl_grads = mod.kl_bwd(g_lp_d, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, kl, kl_stats, tf, 4,
                          (True,) * 3)
    assert_grads(zip(names, kl_grads, head_grads64(dz * g_lp[:, None], hidden, weight, temperature)), t)

    token_loss = _linear_token_loss(g_lp_d, g_ent_d)
    loss, flp, fent, *fgrads = mod.fused_loss_fwd(hidden, weight, bias, labels, tf, -100, token_loss, True, 4, (True,) * 3)
    assert abs(loss.item() - ((g_lp * ref_lp).sum() + (g_ent * ref_ent).sum()).item()) <= t * n
    assert_close(flp, ref_lp, t, "fused logprobs")
    assert_close(fent, ref_ent, t, "fused entropy")
    assert_grads(zip(names, fgrads, head_grads64(logprobs_dz64(z, labels, g_lp, g_ent), hidden, weight, temperature)), t)
    loss0, lp0, ent0, *none = mod.fused_loss_fwd(hidden, weight, bias, labels, tf, -100, token_loss, True, 4, (False,) * 3)
    assert none == [None] * 3 and torch.equal(loss0, loss) and torch.equal(lp0, flp) and torch.equal(ent0, fent)
    for x in (lp, ent, stats, *grads, kl, kl_stats, *kl_grads, loss, flp, fent, *fgrads):
        assert x.grad_fn is None and not x.requires_grad

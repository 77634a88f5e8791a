"""The "torch" backend: chunked over tokens, never more than ``chunk`` x V fp32 logits per buffer.

The math lives in pure functions (``logprobs_fwd`` / ``logprobs_bwd``, ``kl_fwd`` / ``kl_bwd``, ``fused_loss_fwd``):
no autograd state, so that ``torch.library`` custom ops can call them; the autograd Functions are thin wrappers.
Inputs arrive validated and flattened: hidden [N, H], weight [V, H], labels [N] int64 (valid or ignore_index).

Dtypes: everything is computed in fp32 whatever the inputs' dtypes (hidden and weight may differ, e.g. bf16 hidden
states with an fp32 head) and whatever the ambient autocast (autograd may run backward under another one than
forward); each gradient comes back in its input's dtype.

Memory: each chunk's fp32 logits are reduced to a few floats per token and dropped; backward recomputes them from
the saved log-sum-exp. At the peak _BUFFERS (+1 with a softcap) buffers of chunk x V fp32 are alive, plus dhidden's
fp32 [N, H] accumulator in backward. A weight that is not fp32 is never copied to fp32 whole: it is cast one
vocabulary block at a time (see ``_plan``: the fp32 blocks alive together, of the weight, the reference weight and
dweight, take one of those buffers, the backward's logits tiles the others), and backward loops vocabulary blocks
outside token tiles so that every dweight block is written once. The exception is the single-pass
``fused_loss_fwd``: its chunk's logits stay alive from the loss gradient to dz, so dweight sums over token chunks,
in an fp32 [V, H] accumulator (V x H x 4 bytes beyond the budget) when the weight is not fp32.

-inf logits (a bias of -inf forbidding tokens): such a token has p = 0 and, with 0 log 0 = 0, adds nothing to an
entropy or a KL; KL(p || q) is +inf where some p > 0 meets q = 0, with no gradient (0) from that token's row. A
label whose logit is -inf has log-prob -inf. A row whose logits are all -inf holds no distribution: log-probs -inf,
entropy 0, KL from it 0. Gradients stay finite: d logp_y/dz = onehot(y) - p throughout (p = 0 at -inf logits).

The gradient w.r.t. the logits z of
  logprob  log p_y          is  onehot(y) - p
  entropy  H = -sum p log p  is  -p * (log p + H)
  KL(p||q) = sum p (log p - log q)  is  p * (log p - log q - KL)
then multiplied by dz/dx for the raw logits x = hidden @ weight.T + bias (see ``Transform``).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

_BUDGET_BYTES = {"cuda": 1 << 30}  # on GPUs larger chunks keep the matmuls efficient
_DEFAULT_BUDGET = 128 << 20
_BUFFERS = 3  # fp32 [chunk, V] buffers alive at the peak (logits, probabilities, a temporary)
_NEG = torch.finfo(torch.float32).min  # stands for log 0 = -inf where it meets p = 0: 0 * _NEG = 0, 0 * -inf = NaN


def default_chunk_size(vocab: int, device: torch.device, softcap: bool = False) -> int:
    budget = _BUDGET_BYTES.get(device.type, _DEFAULT_BUDGET)
    # a softcap keeps one more buffer alive: the tanh's derivative, from the logits to their gradient
    return max(1, budget // ((_BUFFERS + softcap) * 4 * vocab))


class Transform(NamedTuple):
    """Raw logits x -> final logits z: x * mult, or with a softcap cap * tanh(x * mult).

    Built by :meth:`of` from the public arguments: z = softcap * tanh(x * logit_scale / softcap) / T, i.e.
    mult = logit_scale / softcap and cap = softcap / T; without a softcap mult = logit_scale / T.
    dz/dx = mult, or mult * cap * (1 - tanh^2).
    """

    mult: float
    cap: float | None

    @staticmethod
    def of(temperature: float, logit_scale: float = 1.0, softcap: float | None = None) -> Transform:
        if softcap is None:
            return Transform(logit_scale * (1.0 / temperature), None)  # exactly 1 / T at logit_scale = 1
        return Transform(logit_scale / softcap, softcap / temperature)


def fp32_math(fn):
    """Run ``fn`` without autograd and without autocast on its tensors' device: the math is the fp32 written here,
    whatever the caller's modes. (Shared with the triton backend, whose host-side matmuls autocast would reach too.)"""

    @functools.wraps(fn)
    def run(*args):
        device = next(a.device for a in args if isinstance(a, Tensor))
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            return fn(*args)

    return run


def _plan(weight: Tensor, chunk: int, tf: Transform) -> tuple[int, int]:
    """(vocabulary rows per block, tokens per backward tile).

    An fp32 weight needs no cast: one block, tiles of ``chunk`` tokens. Otherwise up to three fp32 [block, H]
    blocks (weight, reference weight, dweight) share one buffer, and the tiles the remaining buffers.
    """
    v, h = weight.shape
    if weight.dtype == torch.float32:
        return v, chunk
    buffers = _BUFFERS + (tf.cap is not None)
    vb = max(1, min(v, chunk * v // (3 * h)))
    return vb, max(1, chunk * v * (buffers - 1) // (buffers * vb))


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _linear(h32: Tensor, w32: Tensor, bias: Tensor | None, cols: slice) -> Tensor:
    """Raw logits h32 @ w32.T (+ bias[cols]) [n, |cols|] fp32; w32 holds the weight's rows ``cols``."""
    x = h32 @ w32.T
    if bias is not None:
        x += bias[cols]  # in place: a bf16 bias is promoted, not copied
    return x


def _logits(h32: Tensor, weight: Tensor, bias: Tensor | None, vb: int) -> Tensor:
    """Raw logits [n, V] fp32, the weight cast to fp32 ``vb`` rows at a time (none for an fp32 weight)."""
    v = weight.shape[0]
    if vb >= v:
        return _linear(h32, weight.float(), bias, slice(0, v))
    x = h32.new_empty(h32.shape[0], v)
    for cols in _chunks(v, vb):
        x[:, cols] = _linear(h32, weight[cols].float(), bias, cols)
    return x


def _times_weight(dz: Tensor, weight: Tensor, vb: int) -> Tensor:
    """dz [n, V] @ weight [V, H] in fp32, the weight cast ``vb`` rows at a time."""
    v = weight.shape[0]
    if vb >= v:
        return dz @ weight.float()
    out = dz.new_zeros(dz.shape[0], weight.shape[1])
    for cols in _chunks(v, vb):
        out.addmm_(dz[:, cols], weight[cols].float())
    return out


def _transform(x: Tensor, tf: Transform, need_deriv: bool = False):
    """Raw logits x (overwritten) -> (final logits z, d = 1 - tanh^2 of the softcap or None).

    d is computed as 1 / cosh^2 of the tanh's argument rather than as 1 - tanh^2: accurate relative to itself
    where tanh saturates (beyond |x| ~ 44 cosh^2 overflows and d = 0, where its value is < 2e-38 anyway).
    """
    if tf.cap is None:
        if tf.mult != 1.0:
            x *= tf.mult
        return x, None
    x *= tf.mult
    if not need_deriv:
        return x.tanh_().mul_(tf.cap), None
    z = torch.tanh(x).mul_(tf.cap)
    return z, x.cosh_().square_().reciprocal_()


def _chain(dz: Tensor, d: Tensor | None, tf: Transform) -> Tensor:
    """d(loss)/dz (overwritten) -> d(loss)/dx for the raw logits x, through the transform."""
    if d is not None:
        return dz.mul_(d).mul_(tf.mult * tf.cap)
    return dz.mul_(tf.mult) if tf.mult != 1.0 else dz


def _log_softmax(z: Tensor) -> tuple[Tensor, Tensor]:
    """Final logits z [n, V] -> (log-probs, in z's storage, lse [n]).

    A row without a finite logit gets lse = +inf, so its log-probs are -inf rather than NaN (-inf - -inf).
    """
    m = z.amax(dim=-1, keepdim=True)
    m.masked_fill_(m == float("-inf"), 0.0)
    z -= m  # z - max is exact for the entries that matter: keeps log p precise even at |z| ~ 1e4
    s = torch.logsumexp(z, dim=-1, keepdim=True)
    s.masked_fill_(s == float("-inf"), float("inf"))
    z -= s
    return z, (m + s).squeeze(-1)


def _entropy(logp: Tensor) -> Tensor:
    """-sum p log p per row; clamps ``logp`` in place first so that 0 log 0 = 0 where p = 0."""
    logp.clamp_(min=_NEG)
    return -(logp.exp().mul_(logp)).sum(-1)


def _logits_grad(logp: Tensor, col: Tensor, g_lp: Tensor, entropy: Tensor | None, g_ent: Tensor | None) -> Tensor:
    """d(g_lp . logprob + g_ent . entropy)/dz for a tile of log-probs (overwritten, returned).

    col [n]: the column of each row's label within the tile, -1 where the label lies outside it.
    """
    p = logp.exp()
    if g_ent is not None:
        dz = logp.clamp_(min=_NEG).add_(entropy.unsqueeze(-1)).mul_(p).mul_(-g_ent.unsqueeze(-1))  # 0 where p = 0
        dz.addcmul_(p, g_lp.unsqueeze(-1), value=-1.0)
    else:
        dz = p.mul_(-g_lp.unsqueeze(-1))
    return dz.scatter_add_(1, col.clamp(min=0).unsqueeze(-1), (g_lp * (col >= 0)).unsqueeze(-1))


def _label_cols(labels: Tensor, cols: slice) -> Tensor:
    col = labels - cols.start
    return col.masked_fill_((col < 0) | (col >= cols.stop - cols.start), -1)


def _head_grads(hidden, weight, bias, tf: Transform, chunk: int, needs, dlogits, ref=None):
    """(dhidden, dweight, dbias) of sum(dx * x) for the raw logits x = hidden @ weight.T + bias (None where not needed).

    ``dlogits(rows, cols, x, x_ref)`` turns a tile x [n, |cols|] fp32 of raw logits (and x_ref, the same tile of the
    reference head ``ref`` = (ref_hidden, ref_weight, ref_bias), or None) into d(loss)/dx, in place. Vocabulary
    blocks outside token tiles: each block of the weight is cast once and its dweight rows written once; dhidden
    sums over blocks in fp32.
    """
    n = hidden.shape[0]
    vb, tile = _plan(weight, chunk, tf)
    dh = hidden.new_zeros(hidden.shape, dtype=torch.float32) if needs[0] else None
    dw = torch.zeros_like(weight) if needs[1] else None
    db = torch.empty_like(bias) if needs[2] and bias is not None else None
    for cols in _chunks(weight.shape[0], vb):
        w32 = weight[cols].float()
        rw32 = None if ref is None else ref[1][cols].float()
        dw32 = None if dw is None else dw[cols] if dw.dtype == torch.float32 else w32.new_zeros(w32.shape)
        db32 = None if db is None else w32.new_zeros(w32.shape[0])
        for rows in _chunks(n, tile):
            h32 = hidden[rows].float()
            x_ref = None if ref is None else _linear(ref[0][rows].float(), rw32, ref[2], cols)
            dx = dlogits(rows, cols, _linear(h32, w32, bias, cols), x_ref)
            if dh is not None:
                dh[rows].addmm_(dx, w32)
            if dw32 is not None:
                dw32.addmm_(dx.T, h32)
            if db32 is not None:
                db32 += dx.sum(0)
        if dw is not None and dw32.dtype != dw.dtype:
            dw[cols] = dw32
        if db is not None:
            db[cols] = db32
    return None if dh is None else dh.to(hidden.dtype), dw, db


@fp32_math
def logprobs_fwd(hidden, weight, bias, labels, tf: Transform, ignore_index: int, return_entropy: bool, chunk: int):
    """(logprobs [N] fp32, entropy [N] fp32 or None, stats [N, 1] fp32: the log-sum-exp), 0 where ignored."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    n = hidden.shape[0]
    vb = _plan(weight, chunk, tf)[0]
    logprobs = hidden.new_empty(n, dtype=torch.float32)
    lse = torch.empty_like(logprobs)
    entropy = torch.empty_like(logprobs) if return_entropy else None
    for rows in _chunks(n, chunk):
        z, _ = _transform(_logits(hidden[rows].float(), weight, bias, vb), tf)
        logp, lse[rows] = _log_softmax(z)
        logprobs[rows] = logp.gather(1, safe[rows].unsqueeze(-1)).squeeze(-1)
        if return_entropy:
            entropy[rows] = _entropy(logp)
    logprobs.masked_fill_(~valid, 0.0)  # not * valid: an ignored row's stand-in label may have log-prob -inf
    if return_entropy:
        entropy.masked_fill_(~valid, 0.0)
    return logprobs, entropy, lse.unsqueeze(-1)


@fp32_math
def logprobs_bwd(g_lp, g_ent, hidden, weight, bias, labels, stats, entropy, tf: Transform, ignore_index: int,
                 chunk: int, needs):
    """Gradients of sum(g_lp * logprobs + g_ent * entropy) w.r.t. (hidden, weight, bias), each in its input's dtype,
    None where ``needs`` says so. g_lp / g_ent: [N] or None (g_ent only when the forward returned entropy)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    lse = stats[:, 0]
    g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float() * valid
    g_ent = None if g_ent is None or entropy is None else g_ent.float() * valid

    def dlogits(rows, cols, x, _):
        z, d = _transform(x, tf, need_deriv=True)
        logp = z.sub_(lse[rows].unsqueeze(-1))
        ent = None if g_ent is None else entropy[rows]
        dz = _logits_grad(logp, _label_cols(safe[rows], cols), g_lp[rows], ent, None if g_ent is None else g_ent[rows])
        return _chain(dz, d, tf)

    return _head_grads(hidden, weight, bias, tf, chunk, needs, dlogits)


class LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tf, ignore_index, return_entropy, chunk):
        logprobs, entropy, stats = logprobs_fwd(hidden, weight, bias, labels, tf, ignore_index, return_entropy, chunk)
        ctx.save_for_backward(hidden, weight, bias, labels, stats, entropy)
        ctx.cfg = (tf, ignore_index, chunk)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, labels, stats, entropy = ctx.saved_tensors
        tf, ignore_index, chunk = ctx.cfg
        grads = logprobs_bwd(g_lp, g_ent, hidden, weight, bias, labels, stats, entropy, tf, ignore_index, chunk,
                             ctx.needs_input_grad[:3])
        return *grads, None, None, None, None, None


def linear_logprobs(hidden, weight, labels, bias, tf: Transform, ignore_index, return_entropy, chunk):
    return LinearLogprobs.apply(hidden, weight, bias, labels, tf, ignore_index, return_entropy, chunk)


@fp32_math
def kl_fwd(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, tf: Transform, chunk: int):
    """(KL(pi || pi_ref) [N] fp32, 0 where not valid, stats [N, 2] fp32: both log-sum-exps)."""
    n = hidden.shape[0]
    vb, ref_vb = _plan(weight, chunk, tf)[0], _plan(ref_weight, chunk, tf)[0]
    kl = hidden.new_empty(n, dtype=torch.float32)
    stats = hidden.new_empty(n, 2, dtype=torch.float32)
    for rows in _chunks(n, chunk):
        logp, stats[rows, 0] = _log_softmax(_transform(_logits(hidden[rows].float(), weight, bias, vb), tf)[0])
        x_ref = _logits(ref_hidden[rows].float(), ref_weight, ref_bias, ref_vb)
        ref_logp, stats[rows, 1] = _log_softmax(_transform(x_ref, tf)[0])
        diff = ref_logp.neg_().add_(logp)
        p = logp.exp_()
        # 0 log 0 = 0: tokens with p = 0 add nothing (their log p - log q may be NaN); p > 0 where q = 0 gives +inf
        kl[rows] = diff.masked_fill_(p == 0, 0.0).mul_(p).sum(-1)
    return kl.masked_fill_(~valid, 0.0), stats


@fp32_math
def kl_bwd(g_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, kl, stats, tf: Transform, chunk: int,
           needs):
    """Gradients of sum(g_kl * kl) w.r.t. (hidden, weight, bias) (the reference is constant); 0 from rows where
    KL = +inf, which has no finite gradient."""
    lse, ref_lse = stats[:, 0], stats[:, 1]
    live = valid & torch.isfinite(kl)
    g = torch.where(live, g_kl.float(), 0.0)
    kl = torch.where(live, kl, 0.0)

    def dlogits(rows, cols, x, x_ref):
        z, d = _transform(x, tf, need_deriv=True)
        logp = z.sub_(lse[rows].unsqueeze(-1))
        logq = _transform(x_ref, tf)[0].sub_(ref_lse[rows].unsqueeze(-1))
        p = logp.exp()
        # dKL/dz = p (log p - log q - KL). The clamps keep p = 0 (0 log 0 = 0) and q = 0 (rows with g = 0) from NaN.
        dz = logp.clamp_(min=_NEG).sub_(logq.clamp_(min=_NEG)).sub_(kl[rows].unsqueeze(-1)).mul_(p)
        return _chain(dz.mul_(g[rows].unsqueeze(-1)), d, tf)

    return _head_grads(hidden, weight, bias, tf, chunk, needs, dlogits, ref=(ref_hidden, ref_weight, ref_bias))


class LinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, tf, chunk):
        kl, stats = kl_fwd(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, tf, chunk)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, kl, stats)
        ctx.cfg = (tf, chunk)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_kl):
        grads = kl_bwd(g_kl, *ctx.saved_tensors, *ctx.cfg, ctx.needs_input_grad[:3])
        return *grads, None, None, None, None, None, None


def linear_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, tf: Transform, chunk):
    return LinearKL.apply(hidden, weight, bias, ref_hidden.detach(), ref_weight.detach(),
                          None if ref_bias is None else ref_bias.detach(), valid, tf, chunk)


def chunk_loss(token_loss_fn, lp: Tensor, ent: Tensor | None, start: int, end: int, grads: bool):
    """(loss 0-d fp32, dloss/dlp, dloss/dent or None) of one chunk through ``token_loss_fn``; gradients None unless
    ``grads``. Shared with the triton backend."""
    if not grads:
        return token_loss_fn(lp, ent, start, end).float(), None, None
    leaves = [lp.requires_grad_()] if ent is None else [lp.requires_grad_(), ent.requires_grad_()]
    with torch.enable_grad():
        loss = token_loss_fn(lp, ent, start, end)
    if loss.requires_grad:
        g = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    else:  # the loss does not depend on this chunk (e.g. all of it masked out)
        g = [torch.zeros_like(x) for x in leaves]
    return loss.detach().float(), g[0], (g[1] if ent is not None else None)


@fp32_math
def fused_loss_fwd(hidden, weight, bias, labels, tf: Transform, ignore_index: int, token_loss_fn, need_entropy: bool,
                   chunk: int, needs):
    """Loss and its gradients in one pass over token chunks (3 matmul passes: logits, dhidden, dweight).

    The chunk's logits stay alive between the per-token gradients (``token_loss_fn(lp, ent, start, end)`` -> 0-d
    loss, through autograd on [n]-sized leaves) and dz, so nothing is recomputed. Returns (loss 0-d fp32, logprobs
    [N] fp32, entropy [N] fp32 or None, dhidden, dweight, dbias), the gradients in their inputs' dtypes or None
    where ``needs`` says so (with none needed, no gradient work is done).
    """
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    n = hidden.shape[0]
    vb = _plan(weight, chunk, tf)[0]
    logprobs = hidden.new_zeros(n, dtype=torch.float32)
    entropy = torch.zeros_like(logprobs) if need_entropy else None
    loss = hidden.new_zeros((), dtype=torch.float32)
    grads = any(needs)
    dh = torch.empty_like(hidden) if needs[0] else None
    dw32 = weight.new_zeros(weight.shape, dtype=torch.float32) if needs[1] else None  # the output itself when fp32
    db32 = weight.new_zeros(weight.shape[0], dtype=torch.float32) if needs[2] and bias is not None else None
    for rows in _chunks(n, chunk):
        h32 = hidden[rows].float()
        z, d = _transform(_logits(h32, weight, bias, vb), tf, need_deriv=grads)
        logp, _ = _log_softmax(z)
        v = valid[rows]
        lp = logp.gather(1, safe[rows].unsqueeze(-1)).squeeze(-1).masked_fill_(~v, 0.0)
        ent = _entropy(logp).masked_fill_(~v, 0.0) if need_entropy else None
        loss_c, g_lp, g_ent = chunk_loss(token_loss_fn, lp, ent, rows.start, rows.stop, grads)
        loss += loss_c
        logprobs[rows] = lp
        if need_entropy:
            entropy[rows] = ent
        if not grads:
            continue
        dz = _chain(_logits_grad(logp, safe[rows], g_lp * v, ent, None if ent is None else g_ent * v), d, tf)
        if dh is not None:
            dh[rows] = _times_weight(dz, weight, vb)
        if dw32 is not None:
            dw32.addmm_(dz.T, h32)
        if db32 is not None:
            db32 += dz.sum(0)
    dw = None if dw32 is None else dw32.to(weight.dtype)
    db = None if db32 is None else db32.to(bias.dtype)
    return loss, logprobs, entropy, dh, dw, db


class FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tf, ignore_index, token_loss_fn, need_entropy, chunk):
        loss, logprobs, entropy, *grads = fused_loss_fwd(hidden, weight, bias, labels, tf, ignore_index, token_loss_fn,
                                                         need_entropy, chunk, ctx.needs_input_grad[:3])
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(logprobs, *(() if entropy is None else (entropy,)))
        return loss, logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, _g_lp, _g_ent):
        # The gradients were formed in forward; only the incoming scale remains (1 for loss.backward()).
        grads = (None if t is None else g_loss.to(t.dtype) * t for t in ctx.saved_tensors)
        return *grads, None, None, None, None, None, None


def fused_linear_loss(hidden, weight, labels, bias, tf: Transform, ignore_index, token_loss_fn, need_entropy, chunk):
    """(loss 0-d, logprobs [N], entropy [N] or None); the loss differentiable w.r.t. hidden, weight, bias when grad
    mode is on and one of them requires grad, else computed without any gradient work (e.g. an eval call)."""
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not any(needs):
        return fused_loss_fwd(hidden, weight, bias, labels, tf, ignore_index, token_loss_fn, need_entropy, chunk,
                              needs)[:3]
    return FusedLinearLoss.apply(hidden, weight, bias, labels, tf, ignore_index, token_loss_fn, need_entropy, chunk)

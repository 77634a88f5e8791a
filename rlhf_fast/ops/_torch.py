"""The "torch" backend: chunked over tokens, never more than ``chunk`` x V logits alive at once.

Each chunk's logits are formed in fp32 (inputs in bf16/fp16 are upcast: the weight once per call), reduced
to a few floats per token, and dropped; backward recomputes them. The gradient w.r.t. the logits z of
  logprob  log p_y          is  onehot(y) - p
  entropy  H = -sum p log p  is  -p * (log p + H)
  KL(p||q) = sum p (log p - log q)  is  p * (log p - log q - KL)
then multiplied by dz/dx for the raw logits x = hidden @ weight.T + bias (see ``Transform``). Inputs arrive
validated and flattened: hidden [N, H], weight [V, H], labels [N] int64 (valid or ignore_index).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

_BUDGET_BYTES = {"cuda": 1 << 30}  # on GPUs larger chunks keep the matmuls efficient
_DEFAULT_BUDGET = 128 << 20
_BUFFERS = 3  # fp32 [chunk, V] buffers alive at the peak (logits, probabilities, a temporary)


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


def _f32(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.float()


def _logits(h32: Tensor, w32: Tensor, b32: Tensor | None, tf: Transform, need_deriv: bool = False):
    """(final logits z [n, V] fp32, d [n, V] = 1 - tanh^2 of the softcap or None).

    d is computed as 1 / cosh^2 of the tanh's argument rather than as 1 - tanh^2: accurate relative to itself
    where tanh saturates (beyond |x| ~ 44 cosh^2 overflows and d = 0, where its value is < 2e-38 anyway).
    """
    x = h32 @ w32.T
    if b32 is not None:
        x += b32
    if tf.cap is None:
        if tf.mult != 1.0:
            x *= tf.mult
        return x, None
    x *= tf.mult
    if not need_deriv:
        return x.tanh_().mul_(tf.cap), None
    z = torch.tanh(x).mul_(tf.cap)
    return z, x.cosh_().square_().reciprocal_()


def _log_softmax_chunk(h32: Tensor, w32: Tensor, b32: Tensor | None, tf: Transform, need_deriv: bool = False):
    """Logits of one chunk turned into log-probs in place; returns (logp [n, V], lse [n], softcap derivative or None)."""
    z, d = _logits(h32, w32, b32, tf, need_deriv)
    m = z.amax(dim=-1, keepdim=True)
    z -= m  # z - max is exact for the entries that matter: keeps log p precise even at |z| ~ 1e4
    s = torch.logsumexp(z, dim=-1, keepdim=True)
    z -= s
    return z, (m + s).squeeze(-1), d


def _recompute_logp(h32, w32, b32, tf: Transform, lse: Tensor, need_deriv: bool = False):
    """(logp [n, V], softcap derivative or None) of one chunk from its saved log-sum-exp."""
    z, d = _logits(h32, w32, b32, tf, need_deriv)
    return z.sub_(lse.unsqueeze(-1)), d


def _logits_grad(logp: Tensor, safe_labels: Tensor, g_lp: Tensor, entropy: Tensor | None, g_ent: Tensor | None) -> Tensor:
    """d(g_lp . logprob + g_ent . entropy)/dz for one chunk, overwriting ``logp`` (returned)."""
    p = logp.exp()
    if g_ent is not None:
        dz = logp.add_(entropy.unsqueeze(-1)).mul_(p).mul_(-g_ent.unsqueeze(-1))
        dz.addcmul_(p, g_lp.unsqueeze(-1), value=-1.0)
    else:
        dz = p.mul_(-g_lp.unsqueeze(-1))
    return dz.scatter_add_(1, safe_labels.unsqueeze(-1), g_lp.unsqueeze(-1))


class _Grads:
    """fp32 accumulators for dhidden / dweight / dbias over the chunks of one call."""

    def __init__(self, hidden, weight, bias, needs):
        self.dh = torch.zeros_like(hidden) if needs[0] else None
        self.dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None
        self.db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if needs[2] else None

    def add(self, dz: Tensor, h32: Tensor, w32: Tensor, rows: slice, tf: Transform, deriv: Tensor | None) -> None:
        """dz w.r.t. the final logits (overwritten) -> the raw logits' gradient, accumulated into the outputs."""
        if deriv is not None:
            dz.mul_(deriv).mul_(tf.mult * tf.cap)
        elif tf.mult != 1.0:
            dz *= tf.mult
        if self.dh is not None:
            self.dh[rows] = dz @ w32
        if self.dw is not None:
            self.dw.addmm_(dz.T, h32)
        if self.db is not None:
            self.db += dz.sum(0)

    def result(self, weight, bias):
        dw = None if self.dw is None else self.dw.to(weight.dtype)
        db = None if self.db is None else self.db.to(bias.dtype)
        return self.dh, dw, db


def _chunks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield slice(s, min(n, s + chunk))


class LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tf, ignore_index, return_entropy, chunk):
        w32, b32 = _f32(weight), _f32(bias)
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0)
        n = hidden.shape[0]
        logprobs = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logprobs)
        entropy = torch.zeros_like(logprobs) if return_entropy else None
        for rows in _chunks(n, chunk):
            logp, lse[rows], _ = _log_softmax_chunk(hidden[rows].float(), w32, b32, tf)
            logprobs[rows] = logp.gather(1, safe[rows].unsqueeze(-1)).squeeze(-1)
            if return_entropy:
                entropy[rows] = -(logp.exp().mul_(logp)).sum(-1)
        logprobs *= valid
        if return_entropy:
            entropy *= valid
        ctx.save_for_backward(hidden, weight, bias, safe, valid, lse, entropy)
        ctx.cfg = (tf, chunk)
        ctx.mark_non_differentiable(lse)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, safe, valid, lse, entropy = ctx.saved_tensors
        tf, chunk = ctx.cfg
        w32, b32 = _f32(weight), _f32(bias)
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float() * valid
        g_ent = None if g_ent is None or entropy is None else g_ent.float() * valid
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad)
        for rows in _chunks(hidden.shape[0], chunk):
            h32 = hidden[rows].float()
            logp, d = _recompute_logp(h32, w32, b32, tf, lse[rows], need_deriv=True)
            ent = None if g_ent is None else entropy[rows]
            dz = _logits_grad(logp, safe[rows], g_lp[rows], ent, None if g_ent is None else g_ent[rows])
            grads.add(dz, h32, w32, rows, tf, d)
        dh, dw, db = grads.result(weight, bias)
        return dh, dw, db, None, None, None, None, None


def linear_logprobs(hidden, weight, labels, bias, tf: Transform, ignore_index, return_entropy, chunk):
    return LinearLogprobs.apply(hidden, weight, bias, labels, tf, ignore_index, return_entropy, chunk)


class LinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, tf, chunk):
        w32, rw32, b32, rb32 = _f32(weight), _f32(ref_weight), _f32(bias), _f32(ref_bias)
        n = hidden.shape[0]
        kl = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(kl)
        ref_lse = torch.empty_like(kl)
        for rows in _chunks(n, chunk):
            logp, lse[rows], _ = _log_softmax_chunk(hidden[rows].float(), w32, b32, tf)
            ref_logp, ref_lse[rows], _ = _log_softmax_chunk(ref_hidden[rows].float(), rw32, rb32, tf)
            diff = ref_logp.neg_().add_(logp)
            kl[rows] = (logp.exp_() * diff).sum(-1)
        kl *= valid
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, lse, ref_lse, kl)
        ctx.cfg = (tf, chunk)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_kl):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, lse, ref_lse, kl = ctx.saved_tensors
        tf, chunk = ctx.cfg
        w32, rw32, b32, rb32 = _f32(weight), _f32(ref_weight), _f32(bias), _f32(ref_bias)
        g = g_kl.float() * valid
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3])
        for rows in _chunks(hidden.shape[0], chunk):
            h32 = hidden[rows].float()
            logp, d = _recompute_logp(h32, w32, b32, tf, lse[rows], need_deriv=True)
            ref_logp, _ = _recompute_logp(ref_hidden[rows].float(), rw32, rb32, tf, ref_lse[rows])
            # dKL/dz = p * (log p - log q - KL)
            dz = ref_logp.neg_().add_(logp).sub_(kl[rows].unsqueeze(-1)).mul_(logp.exp_()).mul_(g[rows].unsqueeze(-1))
            grads.add(dz, h32, w32, rows, tf, d)
        dh, dw, db = grads.result(weight, bias)
        return dh, dw, db, None, None, None, None, None, None


def linear_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, tf: Transform, chunk):
    return LinearKL.apply(hidden, weight, bias, ref_hidden.detach(), ref_weight.detach(),
                          None if ref_bias is None else ref_bias.detach(), valid, tf, chunk)


class FusedLinearLoss(torch.autograd.Function):
    """Loss and its gradients in one pass over token chunks (3 matmul passes: logits, dhidden, dweight).

    The chunk's logits stay alive between computing the per-token gradients (from ``token_loss_fn``
    through autograd on [n]-sized leaves) and turning them into dz, so nothing is recomputed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tf, ignore_index, token_loss_fn, need_entropy, chunk):
        w32, b32 = _f32(weight), _f32(bias)
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0)
        n = hidden.shape[0]
        logprobs = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logprobs) if need_entropy else None
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for rows in _chunks(n, chunk):
            h32 = hidden[rows].float()
            logp, _, d = _log_softmax_chunk(h32, w32, b32, tf, need_deriv=any(ctx.needs_input_grad[:3]))
            v = valid[rows]
            lp = (logp.gather(1, safe[rows].unsqueeze(-1)).squeeze(-1) * v).requires_grad_()
            ent = (-(logp.exp() * logp).sum(-1) * v).requires_grad_() if need_entropy else None
            with torch.enable_grad():
                loss_c = token_loss_fn(lp, ent, rows.start, rows.stop)
            leaves = [lp] if ent is None else [lp, ent]
            g = torch.autograd.grad(loss_c, leaves, allow_unused=True, materialize_grads=True)
            g_lp = g[0] * v
            g_ent = g[1] * v if need_entropy else None
            loss += loss_c.detach()
            logprobs[rows] = lp.detach()
            if need_entropy:
                entropy[rows] = ent.detach()
            dz = _logits_grad(logp, safe[rows], g_lp, None if ent is None else ent.detach(), g_ent)
            grads.add(dz, h32, w32, rows, tf, d)
        dh, dw, db = grads.result(weight, bias)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (dh, dw, db)))
        ctx.has = (dh is not None, dw is not None, db is not None)
        ctx.mark_non_differentiable(logprobs, *(() if entropy is None else (entropy,)))
        return loss, logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, _g_lp, _g_ent):
        saved = ctx.saved_tensors
        dh, dw, db = (g_loss.to(t.dtype) * t if has else None for t, has in zip(saved, ctx.has))
        return dh, dw, db, None, None, None, None, None, None


def fused_linear_loss(hidden, weight, labels, bias, tf: Transform, ignore_index, token_loss_fn, need_entropy, chunk):
    return FusedLinearLoss.apply(hidden, weight, bias, labels, tf, ignore_index, token_loss_fn, need_entropy, chunk)

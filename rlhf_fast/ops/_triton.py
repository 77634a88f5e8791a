"""The "triton" backend: autograd around the kernels of ``rlhf_fast_kernels`` (the repo's kernels/ folder).

As in the torch backend, the math is in pure functions (``logprobs_fwd`` / ``logprobs_bwd``, ``kl_fwd`` / ``kl_bwd``,
``fused_loss_fwd``, same signatures; ``chunk`` is the single-pass loss's token chunk, None for its budget, and is
ignored elsewhere) that ``torch.library`` custom ops can call, and the autograd Functions are thin wrappers.

Inputs arrive validated, flattened and contiguous (see the public ops): hidden [N, H], weight [V, H] (their dtypes
may differ: the kernels then compute in fp32), labels [N] int64 (valid or ignore_index), the logit transform as a
``_torch.Transform`` (its mult and cap are the kernels' inv_temp and cap). The kernels accumulate in fp32 and return
gradients in the inputs' dtypes, whatever the ambient autocast; -inf logits follow the torch backend's convention
(see there); see kernels/*.py for the tiling and why no reduction races.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from rlhf_fast_kernels import fused_linear_loss as _fused
from rlhf_fast_kernels import gae as _gae
from rlhf_fast_kernels import linear_kl as _kl
from rlhf_fast_kernels import linear_logprobs as _lp

from ._torch import Transform, chunk_loss, fp32_math


def _on_inputs_gpu(fn):
    """Run ``fn`` with its first tensor's GPU current: Triton launches on the current CUDA device, which for
    inputs on cuda:1 need not be theirs."""

    @functools.wraps(fn)
    def run(*args):
        device = next(a.device for a in args if isinstance(a, Tensor))
        if device.type != "cuda":
            return fn(*args)
        with torch.cuda.device(device):
            return fn(*args)

    return run


def _entry(fn):
    return _on_inputs_gpu(fp32_math(fn))


def _c(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.contiguous()


@_entry
def logprobs_fwd(hidden, weight, bias, labels, tf: Transform, ignore_index: int, return_entropy: bool, chunk):
    """(logprobs [N] fp32, entropy [N] fp32 or None, stats [N, 2] fp32: (m, log_s), lse = m + log_s), 0 where ignored."""
    logprobs, entropy, m, log_s = _lp.linear_logprobs_fwd(hidden, weight, _c(bias), labels, tf.mult, ignore_index,
                                                          return_entropy, cap=tf.cap)
    return logprobs, entropy, torch.stack((m, log_s), 1)


@_entry
def logprobs_bwd(g_lp, g_ent, hidden, weight, bias, labels, stats, entropy, tf: Transform, ignore_index: int, chunk,
                 needs):
    """Gradients of sum(g_lp * logprobs + g_ent * entropy) w.r.t. (hidden, weight, bias), in their dtypes, None where
    ``needs`` says so. g_lp / g_ent: [N] or None."""
    m, log_s = stats.T.contiguous()
    return _lp.linear_logprobs_bwd(hidden, weight, _c(bias), labels, m, log_s, entropy, g_lp,
                                   g_ent if entropy is not None else None, tf.mult, ignore_index, needs[0], needs[1],
                                   needs[2] and bias is not None, cap=tf.cap)


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tf, ignore_index, return_entropy):
        logprobs, entropy, stats = logprobs_fwd(hidden, weight, bias, labels, tf, ignore_index, return_entropy, None)
        ctx.save_for_backward(hidden, weight, bias, labels, stats, entropy)
        ctx.cfg = (tf, ignore_index)
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, labels, stats, entropy = ctx.saved_tensors
        tf, ignore_index = ctx.cfg
        grads = logprobs_bwd(g_lp, g_ent, hidden, weight, bias, labels, stats, entropy, tf, ignore_index, None,
                             ctx.needs_input_grad[:3])
        return *grads, None, None, None, None


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, tf: Transform,
                    ignore_index: int, return_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """(logprobs [N] fp32, entropy [N] fp32 or None), 0 where ignored; differentiable w.r.t. hidden, weight, bias."""
    return _LinearLogprobs.apply(hidden, weight, bias, labels, tf, ignore_index, return_entropy)


@_entry
def kl_fwd(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, tf: Transform, chunk):
    """(KL(pi || pi_ref) [N] fp32, 0 where not valid, stats [N, 4] fp32: (m, log_s) of each head)."""
    kl, *stats = _kl.linear_kl_fwd(hidden, weight, ref_hidden, ref_weight, valid, tf.mult, bias=_c(bias),
                                   ref_bias=_c(ref_bias), cap=tf.cap)
    return kl, torch.stack(stats, 1)


@_entry
def kl_bwd(g_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, kl, stats, tf: Transform, chunk, needs):
    """Gradients of sum(g_kl * kl) w.r.t. (hidden, weight, bias) (the reference is constant); 0 from rows of KL = +inf."""
    m, log_s, ref_m, ref_log_s = stats.T.contiguous()
    return _kl.linear_kl_bwd(hidden, weight, ref_hidden, ref_weight, valid, kl, m, log_s, ref_m, ref_log_s, g_kl,
                             tf.mult, needs[0], needs[1], bias=_c(bias), ref_bias=_c(ref_bias), cap=tf.cap,
                             need_db=needs[2] and bias is not None)


class _LinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, tf):
        kl, stats = kl_fwd(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, tf, None)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, kl, stats)
        ctx.tf = tf
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, g_kl):
        grads = kl_bwd(g_kl, *ctx.saved_tensors, ctx.tf, None, ctx.needs_input_grad[:3])
        return *grads, None, None, None, None, None


def linear_kl(hidden: Tensor, weight: Tensor, bias: Tensor | None, ref_hidden: Tensor, ref_weight: Tensor,
              ref_bias: Tensor | None, labels: Tensor | None, tf: Transform, ignore_index: int) -> Tensor:
    """Exact KL(pi || pi_ref) [N] fp32 per token, 0 where labels == ignore_index; differentiable w.r.t. hidden,
    weight, bias (the reference side is constant)."""
    if labels is None:
        valid = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    else:
        valid = labels != ignore_index
    ref_bias = None if ref_bias is None else ref_bias.detach()
    return _LinearKL.apply(hidden, weight, bias, ref_hidden.detach(), ref_weight.detach(), ref_bias, valid, tf)


@_entry
def fused_loss_fwd(hidden, weight, bias, labels, tf: Transform, ignore_index: int, token_loss_fn, need_entropy: bool,
                   chunk, needs):
    """Single-pass loss (see ``_torch.fused_loss_fwd``): (loss 0-d fp32, logprobs [N] fp32, entropy [N] fp32 or None,
    dhidden, dweight, dbias), the gradients in their inputs' dtypes or None where ``needs`` says so."""
    grads = any(needs)

    def token_grads(lp, ent, start, end):
        return chunk_loss(token_loss_fn, lp, ent if need_entropy else None, start, end, grads)

    return _fused.fused_linear_loss(hidden, weight, _c(labels), _c(bias), tf.mult, ignore_index, token_grads,
                                    need_entropy, chunk, needs[0], needs[1], needs[2] and bias is not None, cap=tf.cap)


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tf, ignore_index, token_loss_fn, need_entropy, chunk_size):
        loss, logprobs, entropy, *grads = fused_loss_fwd(hidden, weight, bias, labels, tf, ignore_index, token_loss_fn,
                                                         need_entropy, chunk_size, ctx.needs_input_grad[:3])
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(logprobs, *(() if entropy is None else (entropy,)))
        return loss, logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, _g_lp, _g_ent):
        # The gradients were formed in forward; only the incoming scale remains (1 for loss.backward()).
        return (*(None if t is None else t * g_loss.to(t.dtype) for t in ctx.saved_tensors),
                None, None, None, None, None, None)


def fused_linear_loss(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, tf: Transform,
                      ignore_index: int, token_loss_fn, need_entropy: bool, chunk_size: int | None):
    """Single-pass loss: (loss 0-d, logprobs [N], entropy [N] or None); the loss differentiable w.r.t. hidden,
    weight, bias when grad mode is on and one of them requires grad, else computed without any gradient work."""
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not any(needs):
        return fused_loss_fwd(hidden, weight, bias, labels, tf, ignore_index, token_loss_fn, need_entropy, chunk_size,
                              needs)[:3]
    return _FusedLinearLoss.apply(hidden, weight, bias, labels, tf, ignore_index, token_loss_fn, need_entropy,
                                  chunk_size)


@_on_inputs_gpu
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """(advantages, returns) [B, T] fp32 by a parallel scan over time; 0 at masked positions."""
    return _gae.gae(rewards, values, mask, gamma, lam)

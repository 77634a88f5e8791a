"""The "triton" backend: autograd around the kernels of ``rlhf_fast_kernels`` (the repo's kernels/ folder).

Inputs arrive validated, flattened and contiguous (see the public ops): hidden [N, H], weight [V, H] of one
dtype, labels [N] int64 (valid or ignore_index), the logit transform as a ``_torch.Transform`` (its mult and
cap are the kernels' inv_temp and cap). The kernels accumulate in fp32 and return gradients in the inputs'
dtypes; see kernels/*.py for the tiling and why no reduction races.
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

from ._torch import Transform


def _on_inputs_gpu(fn):
    """Run ``fn`` with its first tensor's GPU current: Triton launches on the current CUDA device, which for
    inputs on cuda:1 need not be theirs. (Autograd runs each backward with its device already current.)"""

    @functools.wraps(fn)
    def run(x, *args):
        if x.device.type != "cuda":
            return fn(x, *args)
        with torch.cuda.device(x.device):
            return fn(x, *args)

    return run


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tf, ignore_index, return_entropy):
        logprobs, entropy, m, log_s = _lp.linear_logprobs_fwd(hidden, weight, bias, labels, tf.mult, ignore_index,
                                                              return_entropy, cap=tf.cap)
        ctx.save_for_backward(hidden, weight, bias, labels, m, log_s, entropy)
        ctx.cfg = (tf, ignore_index)
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, labels, m, log_s, entropy = ctx.saved_tensors
        tf, ignore_index = ctx.cfg
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        dh, dw, db = _lp.linear_logprobs_bwd(
            hidden, weight, bias, labels, m, log_s, entropy, g_lp, g_ent if entropy is not None else None,
            tf.mult, ignore_index, need_dh, need_dw, need_db and bias is not None, cap=tf.cap,
        )
        return dh, dw, db, None, None, None, None


@_on_inputs_gpu
def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, tf: Transform,
                    ignore_index: int, return_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """(logprobs [N] fp32, entropy [N] fp32 or None), 0 where ignored; differentiable w.r.t. hidden, weight, bias."""
    if bias is not None:
        bias = bias.contiguous()
    return _LinearLogprobs.apply(hidden, weight, bias, labels, tf, ignore_index, return_entropy)


class _LinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, tf):
        kl, m, log_s, ref_m, ref_log_s = _kl.linear_kl_fwd(hidden, weight, ref_hidden, ref_weight, valid, tf.mult,
                                                           bias=bias, ref_bias=ref_bias, cap=tf.cap)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, kl, m, log_s, ref_m, ref_log_s)
        ctx.tf = tf
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, g_kl):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, kl, m, log_s, ref_m, ref_log_s = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        dh, dw, db = _kl.linear_kl_bwd(hidden, weight, ref_hidden, ref_weight, valid, kl, m, log_s, ref_m, ref_log_s,
                                       g_kl, ctx.tf.mult, need_dh, need_dw, bias=bias, ref_bias=ref_bias,
                                       cap=ctx.tf.cap, need_db=need_db and bias is not None)
        return dh, dw, db, None, None, None, None, None


@_on_inputs_gpu
def linear_kl(hidden: Tensor, weight: Tensor, bias: Tensor | None, ref_hidden: Tensor, ref_weight: Tensor,
              ref_bias: Tensor | None, labels: Tensor | None, tf: Transform, ignore_index: int) -> Tensor:
    """Exact KL(pi || pi_ref) [N] fp32 per token, 0 where labels == ignore_index; differentiable w.r.t. hidden,
    weight, bias (the reference side is constant)."""
    if labels is None:
        valid = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    else:
        valid = labels != ignore_index
    bias = None if bias is None else bias.contiguous()
    ref_bias = None if ref_bias is None else ref_bias.detach().contiguous()
    return _LinearKL.apply(hidden, weight, bias, ref_hidden.detach(), ref_weight.detach(), ref_bias, valid, tf)


def _token_grads(token_loss_fn, need_entropy: bool):
    """Wrap ``token_loss_fn`` into the kernels' callback: (loss, dloss/dlogprobs, dloss/dentropy) of one chunk."""

    def token_grads(lp: Tensor, ent: Tensor | None, start: int, end: int):
        lp = lp.detach().requires_grad_()
        ent = ent.detach().requires_grad_() if need_entropy else None
        leaves = [lp] if ent is None else [lp, ent]
        with torch.enable_grad():
            loss_c = token_loss_fn(lp, ent, start, end)
        if loss_c.requires_grad:
            grads = torch.autograd.grad(loss_c, leaves, allow_unused=True, materialize_grads=True)
        else:  # the loss does not depend on this chunk (e.g. all of it masked out)
            grads = [torch.zeros_like(x) for x in leaves]
        return loss_c.detach().float(), grads[0], (grads[1] if need_entropy else None)

    return token_grads


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tf, ignore_index, token_loss_fn, need_entropy, chunk_size):
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        loss, logprobs, entropy, dh, dw, db = _fused.fused_linear_loss(
            hidden, weight, labels, bias, tf.mult, ignore_index, _token_grads(token_loss_fn, need_entropy),
            need_entropy, chunk_size, need_dh, need_dw, need_db and bias is not None, cap=tf.cap,
        )
        ctx.save_for_backward(dh, dw, db)
        ctx.mark_non_differentiable(logprobs, *(() if entropy is None else (entropy,)))
        return loss, logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, _g_lp, _g_ent):
        # The gradients were formed in forward; only the incoming scale remains (1 for loss.backward()).
        return (*(None if t is None else t * g_loss.to(t.dtype) for t in ctx.saved_tensors),
                None, None, None, None, None, None)


@_on_inputs_gpu
def fused_linear_loss(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, tf: Transform,
                      ignore_index: int, token_loss_fn, need_entropy: bool, chunk_size: int | None):
    """Single-pass loss: (loss 0-d differentiable w.r.t. hidden/weight/bias, logprobs [N], entropy [N] or None), detached."""
    if bias is not None:
        bias = bias.contiguous()
    return _FusedLinearLoss.apply(hidden, weight, bias, labels.contiguous(), tf, ignore_index, token_loss_fn,
                                  need_entropy, chunk_size)


@_on_inputs_gpu
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """(advantages, returns) [B, T] fp32 by a parallel scan over time; 0 at masked positions."""
    return _gae.gae(rewards, values, mask, gamma, lam)

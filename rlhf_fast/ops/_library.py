"""The fused ops as ``torch.library`` custom ops (namespace ``rlhf_fast``).

Opaque to torch.compile: dynamo records one call instead of tracing chunk loops and Triton launches (no graph
break); AOTAutograd takes shapes from the fake implementations and gradients from the registered autograd.
Inputs arrive validated and flattened from the public ops: hidden [N, H], weight [V, H], bias [V] or None,
labels [N] int64 / valid [N] bool, each float tensor in its own dtype; the logit transform as
``_torch.Transform``'s (mult, cap); the backend by name ("torch" | "triton"). Custom ops return tensors only:
an absent output (entropy not asked for, a gradient not needed) is an empty tensor.
"""
import torch
from torch import Tensor

from . import _torch
from ._torch import Transform

_F32 = torch.float32
# k of the backends' stats [N, k] (see their *_fwd): log-sum-exps ("torch"), running max and log-sum ("triton")
_STATS = {("logprobs", "torch"): 1, ("logprobs", "triton"): 2, ("kl", "torch"): 2, ("kl", "triton"): 4}


def _backend(name: str):
    if name == "triton":
        from . import _triton  # imports triton: only when asked for

        return _triton
    return _torch


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _grads_out(grads, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_or_empty(g, x) for g, x in zip(grads, (hidden, weight, weight if bias is None else bias)))


def _fake_grads(hidden, weight, bias, *needs):
    """dh, dw, db as the backends return them: each in its input's dtype, or empty."""
    xs = (hidden, weight, weight if bias is None else bias)
    return tuple(torch.empty_like(x) if need else x.new_empty(0) for x, need in zip(xs, needs))


def _needed(grads, needs):
    return tuple(g if need else None for g, need in zip(grads, needs))


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


# --- log-probs -----------------------------------------------------------------------------------------------------

@torch.library.custom_op("rlhf_fast::linear_logprobs", mutates_args=())
def _logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, mult: float, cap: float | None,
              ignore_index: int, return_entropy: bool, chunk: int | None, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs [N] f32, entropy [N] f32 or [0], stats [N, k] f32: what backward needs of the forward)."""
    lp, ent, stats = _backend(backend).logprobs_fwd(hidden, weight, bias, labels, Transform(mult, cap), ignore_index,
                                                    return_entropy, chunk)
    return lp, _or_empty(ent, lp), stats


@_logprobs.register_fake
def _(hidden, weight, bias, labels, mult, cap, ignore_index, return_entropy, chunk, backend):
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=_F32), hidden.new_empty(n if return_entropy else 0, dtype=_F32),
            hidden.new_empty(n, _STATS["logprobs", backend], dtype=_F32))


@torch.library.custom_op("rlhf_fast::linear_logprobs_backward", mutates_args=())
def _logprobs_bwd(g_lp: Tensor | None, g_ent: Tensor | None, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                  labels: Tensor, stats: Tensor, entropy: Tensor | None, mult: float, cap: float | None,
                  ignore_index: int, chunk: int | None, backend: str, need_dh: bool, need_dw: bool,
                  need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dh, dw, db), each in its input's dtype, or empty where not needed."""
    grads = _backend(backend).logprobs_bwd(g_lp, g_ent, hidden, weight, bias, labels, stats, entropy, Transform(mult, cap),
                                           ignore_index, chunk, (need_dh, need_dw, need_db))
    return _grads_out(grads, hidden, weight, bias)


@_logprobs_bwd.register_fake
def _(g_lp, g_ent, hidden, weight, bias, labels, stats, entropy, mult, cap, ignore_index, chunk, backend, *needs):
    return _fake_grads(hidden, weight, bias, *needs)


def _logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, labels, *cfg = inputs
    _, entropy, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(hidden, weight, bias, labels, stats, entropy)
    ctx.cfg = cfg  # mult, cap, ignore_index, return_entropy, chunk, backend


def _logprobs_backward(ctx, g_lp, g_ent, _g_stats):
    hidden, weight, bias, labels, stats, entropy = ctx.saved_tensors
    mult, cap, ignore_index, return_entropy, chunk, backend = ctx.cfg
    needs = ctx.needs_input_grad[:3]
    if not return_entropy:
        g_ent = entropy = None
    grads = _logprobs_bwd(g_lp, g_ent, hidden, weight, bias, labels, stats, entropy, mult, cap, ignore_index, chunk, backend,
                          *needs)
    return (*_needed(grads, needs), None, None, None, None, None, None, None)


_logprobs.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)


def linear_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, tf: Transform, ignore_index: int,
                    return_entropy: bool, chunk: int | None, backend: str) -> tuple[Tensor, Tensor | None]:
    """(logprobs [N] f32, entropy [N] f32 or None); differentiable w.r.t. hidden, weight, bias."""
    lp, ent, _ = _logprobs(hidden.contiguous(), weight.contiguous(), _contiguous(bias), labels.contiguous(), tf.mult, tf.cap,
                           ignore_index, return_entropy, chunk, backend)
    return lp, ent if return_entropy else None


# --- exact KL ------------------------------------------------------------------------------------------------------

@torch.library.custom_op("rlhf_fast::linear_kl", mutates_args=())
def _kl(hidden: Tensor, weight: Tensor, bias: Tensor | None, ref_hidden: Tensor, ref_weight: Tensor,
        ref_bias: Tensor | None, valid: Tensor, mult: float, cap: float | None, chunk: int | None,
        backend: str) -> tuple[Tensor, Tensor]:
    """(kl [N] f32, stats [N, k] f32)."""
    return _backend(backend).kl_fwd(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, Transform(mult, cap), chunk)


@_kl.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, mult, cap, chunk, backend):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=_F32), hidden.new_empty(n, _STATS["kl", backend], dtype=_F32)


@torch.library.custom_op("rlhf_fast::linear_kl_backward", mutates_args=())
def _kl_bwd(g_kl: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, ref_hidden: Tensor, ref_weight: Tensor,
            ref_bias: Tensor | None, valid: Tensor, kl: Tensor, stats: Tensor, mult: float, cap: float | None,
            chunk: int | None, backend: str, need_dh: bool, need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    grads = _backend(backend).kl_bwd(g_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, kl, stats,
                                     Transform(mult, cap), chunk, (need_dh, need_dw, need_db))
    return _grads_out(grads, hidden, weight, bias)


@_kl_bwd.register_fake
def _(g_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, kl, stats, mult, cap, chunk, backend, *needs):
    return _fake_grads(hidden, weight, bias, *needs)


def _kl_setup(ctx, inputs, output):
    *tensors, mult, cap, chunk, backend = inputs
    kl, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(*tensors, kl, stats)
    ctx.cfg = (mult, cap, chunk, backend)


def _kl_backward(ctx, g_kl, _g_stats):
    needs = ctx.needs_input_grad[:3]  # the reference side is constant
    grads = _kl_bwd(g_kl, *ctx.saved_tensors, *ctx.cfg, *needs)
    return (*_needed(grads, needs), None, None, None, None, None, None, None, None)


_kl.register_autograd(_kl_backward, setup_context=_kl_setup)


def linear_kl(hidden: Tensor, weight: Tensor, bias: Tensor | None, ref_hidden: Tensor, ref_weight: Tensor,
              ref_bias: Tensor | None, valid: Tensor, tf: Transform, chunk: int | None, backend: str) -> Tensor:
    """KL(pi || pi_ref) [N] f32, 0 where not valid; differentiable w.r.t. hidden, weight, bias (not the reference)."""
    return _kl(hidden.contiguous(), weight.contiguous(), _contiguous(bias), ref_hidden.contiguous(), ref_weight.contiguous(),
               _contiguous(ref_bias), valid.contiguous(), tf.mult, tf.cap, chunk, backend)[0]


# --- single-pass policy loss ---------------------------------------------------------------------------------------

def _recording(fn):
    """Custom-op kernels run with autograd's dispatch key excluded; the per-token loss callback needs it back: the
    backends take dloss/dlogprobs from its graph on [n]-sized leaves."""

    def run(*args):
        with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False), torch.enable_grad():
            return fn(*args)

    return run


@torch.library.custom_op("rlhf_fast::linear_ppo_loss", mutates_args=())
def _ppo(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, mask: Tensor, weights: Tensor,
         advantages: Tensor, old_logprobs: Tensor | None, ref_logprobs: Tensor | None, policy_loss: str, clip_lo: float,
         clip_hi: float, dual_clip: float | None, tau_pos: float, tau_neg: float, entropy_coef: float, kl_coef: float,
         kl_estimator: str, kl_clip: float | None, mult: float, cap: float | None, ignore_index: int,
         chunk: int | None, backend: str, need_dh: bool, need_dw: bool,
         need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss 0-d f32, logprobs [N] f32, entropy [N] f32, dh, dw, db): the loss's gradients, formed in the same pass."""
    from .ppo import PolicyLossConfig, chunk_loss_fn  # ppo imports this module

    cfg = PolicyLossConfig(policy_loss, "token", clip_lo, clip_hi, dual_clip, tau_pos, tau_neg)
    loss_fn = chunk_loss_fn(mask, weights, advantages, old_logprobs, ref_logprobs, cfg, entropy_coef, kl_coef, kl_estimator,
                            kl_clip)
    loss, lp, ent, *grads = _backend(backend).fused_loss_fwd(hidden, weight, bias, labels, Transform(mult, cap), ignore_index,
                                                             _recording(loss_fn), True, chunk, (need_dh, need_dw, need_db))
    return (loss, lp, ent, *_grads_out(grads, hidden, weight, bias))


@_ppo.register_fake
def _(hidden, weight, bias, *args):
    n = hidden.shape[0]
    f32 = hidden.new_empty(n, dtype=_F32)
    return (hidden.new_empty((), dtype=_F32), f32, torch.empty_like(f32), *_fake_grads(hidden, weight, bias, *args[-3:]))


def _ppo_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[3:])
    ctx.needs = inputs[-3:]
    ctx.n_inputs = len(inputs)


def _ppo_backward(ctx, g_loss, *_):
    # The gradients were formed in forward; only the incoming scale remains (1 for loss.backward()).
    grads = (g_loss.to(d.dtype) * d if need else None for d, need in zip(ctx.saved_tensors, ctx.needs))
    return (*grads, *[None] * (ctx.n_inputs - 3))


_ppo.register_autograd(_ppo_backward, setup_context=_ppo_setup)


def linear_ppo_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, mask: Tensor, weights: Tensor,
                    advantages: Tensor, old_logprobs: Tensor | None, ref_logprobs: Tensor | None, cfg, entropy_coef: float,
                    kl_coef: float, kl_estimator: str, kl_clip: float | None, tf: Transform, ignore_index: int,
                    chunk: int | None, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss 0-d f32 differentiable w.r.t. hidden, weight, bias; logprobs [N], entropy [N] f32, detached).

    Token tensors [N]: mask bool, the rest float32 (weights: the aggregation's, 0 off the mask); old_logprobs None:
    on-policy. ``cfg``: ppo.PolicyLossConfig (importance_ratio "token")."""
    needs = [torch.is_grad_enabled() and x is not None and x.requires_grad for x in (hidden, weight, bias)]
    loss, lp, ent, *_ = _ppo(hidden.contiguous(), weight.contiguous(), _contiguous(bias), labels.contiguous(), mask, weights,
                             advantages, old_logprobs, ref_logprobs, cfg.kind, cfg.clip_lo, cfg.clip_hi, cfg.dual_clip, cfg.tau_pos, cfg.tau_neg, entropy_coef, kl_coef,
                             kl_estimator, kl_clip, tf.mult, tf.cap, ignore_index, chunk, backend, *needs)
    return loss, lp, ent

"""PPO clipped losses (Schulman et al. 2017), with dual-clip (Ye et al. 2020) and asymmetric clipping."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, _torch
from ._backend import resolve
from ._rows import ValidRows
from .kl import KL_ESTIMATORS, kl_penalty
from .logprobs import _chunk_size
from .masked import masked_mean

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: beyond any real ratio, and keeps -A * ratio finite (no 0 * inf = NaN)
_LOSS_DTYPES = (torch.float32, torch.float64)


def agg_weights(mask: Tensor, loss_agg: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-token weights w with loss = sum(w * per_token_loss) for each ``loss_agg``.

    "token-mean": 1 / (number of valid tokens). "seq-mean-token-mean": 1 / (row's valid tokens x rows with any).
    "seq-mean-token-sum": 1 / (rows with any valid token). Rows are the leading dims, tokens the last one.
    """
    m = mask.to(dtype)
    if loss_agg == "token-mean":
        return m / m.sum().clamp(min=1)
    per_row = m.sum(-1, keepdim=True)
    rows = (per_row > 0).sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        return m / per_row.clamp(min=1) / rows
    return m / rows


def _aggregate(x: Tensor, mask: Tensor, weights: Tensor) -> Tensor:
    return (torch.where(mask, x, 0) * weights).sum()


def _check_clip(clip_eps, clip_eps_high, dual_clip):
    lo = _checks.positive("clip_eps", clip_eps)
    hi = _checks.positive("clip_eps_high", clip_eps_high, allow_none=True)
    c = _checks.positive("dual_clip", dual_clip, allow_none=True, above=1.0)
    return lo, (lo if hi is None else hi), c


def _check_agg(loss_agg, mask):
    _checks.choice("loss_agg", loss_agg, LOSS_AGGS)
    if loss_agg != "token-mean" and mask.dim() < 2:
        raise ValueError(f"loss_agg: {loss_agg!r} needs [B, T] inputs (sequences), got shape {tuple(mask.shape)}")


def policy_token_loss(logprobs, old_logprobs, advantages, clip_lo, clip_hi, dual_clip):
    """Per-token clipped surrogate; returns (loss, ratio, log_ratio, clipped, dual_clipped)."""
    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_lo, 1.0 + clip_hi)
    loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    is_dual = torch.zeros_like(is_clipped)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        is_dual = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
    return loss, ratio, log_ratio, is_clipped, is_dual


def _policy_stats(ratio, log_ratio, is_clipped, is_dual, mask, dual_clip) -> dict[str, Tensor]:
    with torch.no_grad():
        ratio_max = torch.where(mask, ratio, float("-inf")).max() if ratio.numel() else ratio.new_zeros(())
        stats = {
            "clipfrac": masked_mean(is_clipped.float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),  # k3 of KL(old || new), samples from old
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(mask.any(), ratio_max, 0.0),
        }
        if dual_clip is not None:
            stats["dual_clipfrac"] = masked_mean(is_dual.float(), mask)
    return stats


def _check_token_tensors(ref_name: str, ref: Tensor, response_mask, **tensors) -> Tensor:
    _checks.float_tensor(ref_name, ref, dtypes=_LOSS_DTYPES)
    for name, x in tensors.items():
        _checks.float_tensor(name, x, dtypes=_LOSS_DTYPES)
        _checks.same_shape(name, x, ref_name, ref)
        _checks.same_device(name, x, ref_name, ref)
    return _checks.mask("response_mask", response_mask, ref_name, ref)


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    loss_agg: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), negated for minimisation.

    ratio = exp(logprobs - old_logprobs) (log-ratio clamped to +-20 so that no 0 * inf NaN arises);
    per-token loss = max(-A ratio, -A clip(ratio, 1 - clip_eps, 1 + (clip_eps_high or clip_eps)))
    (asymmetric "clip-higher" as in DAPO, Yu et al. 2025); with ``dual_clip=c`` (c > 1) tokens with A < 0 take
    min(that, -A c) (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL").

    Args:
        logprobs, old_logprobs, advantages: [B, T] (or any shape for "token-mean") float32/float64, nats.
        response_mask: bool or 0/1, same shape. loss_agg: "token-mean" (sum over valid tokens / their count),
            "seq-mean-token-mean" (mean over rows with a valid token of each row's token mean),
            "seq-mean-token-sum" (mean over those rows of each row's token sum).
    Returns:
        (loss 0-d, stats) with stats 0-d detached tensors: clipfrac, approx_kl (k3), ratio_mean, ratio_max
        (and dual_clipfrac with dual_clip). No host synchronisation. 0 when no token is valid.
    Raises:
        TypeError / ValueError naming the argument (clip_eps <= 0, dual_clip <= 1, unknown loss_agg, ...).
    """
    mask = _check_token_tensors("logprobs", logprobs, response_mask, old_logprobs=old_logprobs, advantages=advantages)
    lo, hi, c = _check_clip(clip_eps, clip_eps_high, dual_clip)
    _check_agg(loss_agg, mask)
    loss_t, ratio, log_ratio, is_clipped, is_dual = policy_token_loss(logprobs, old_logprobs, advantages, lo, hi, c)
    loss = _aggregate(loss_t, mask, agg_weights(mask, loss_agg, loss_t.dtype))
    return loss, _policy_stats(ratio, log_ratio, is_clipped, is_dual, mask, c)


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    *,
    clip_eps: float = 0.2,
    loss_agg: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: 1/2 max((V - R)^2, (old_V + clip(V - old_V, -eps, eps) - R)^2) (as in OpenAI's PPO2 baselines).

    Args:
        values, old_values, returns: same-shape float32/float64; response_mask: bool or 0/1; loss_agg as in
        :func:`ppo_policy_loss`.
    Returns:
        (loss 0-d, {"vf_clipfrac": fraction of valid tokens where the clipped term is the larger}).
    Raises:
        TypeError / ValueError naming the argument.
    """
    mask = _check_token_tensors("values", values, response_mask, old_values=old_values, returns=returns)
    eps = _checks.positive("clip_eps", clip_eps)
    _check_agg(loss_agg, mask)
    clipped_values = old_values + (values - old_values).clamp(-eps, eps)
    unclipped_err = (values - returns).square()
    clipped_err = (clipped_values - returns).square()
    loss = _aggregate(0.5 * torch.maximum(unclipped_err, clipped_err), mask, agg_weights(mask, loss_agg, values.dtype))
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped_err > unclipped_err).float(), mask)}
    return loss, stats


def linear_ppo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    entropy_coef: float = 0.0,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    temperature: float = 1.0,
    loss_agg: str = "token-mean",
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Single-pass PPO policy loss straight from hidden states: log-probs, entropy, loss and gradients together.

    Equals ``ppo_policy_loss(linear_logprobs(hidden, weight, labels, temperature=...), old_logprobs, advantages,
    response_mask, ...)[0] - entropy_coef * agg(entropy) + kl_coef * agg(kl_penalty(logprobs, ref_logprobs,
    kl_estimator))`` in value and gradient (agg as ``loss_agg``). Because dloss/dlogprob is known as soon as a
    chunk's log-probs are, the gradients are formed in the forward pass: forward + backward cost 3 matmul passes
    over N x H x V instead of 4; backward only scales them.

    Args:
        hidden: [B, T, H] (or [..., H]) float32/bfloat16/float16; weight: [V, H] same dtype.
        labels: hidden's leading shape, int64 in [0, V) or ignore_index; positions outside response_mask are ignored.
        old_logprobs, advantages (and ref_logprobs when kl_coef != 0): float32/float64, labels' shape.
        response_mask: bool or 0/1, labels' shape; every valid position needs a valid label.
        clip_eps, clip_eps_high, dual_clip, loss_agg: as in :func:`ppo_policy_loss`.
        entropy_coef: >= 0 weight of the entropy bonus. kl_coef: >= 0 weight of the in-loss KL penalty
            (estimator ``kl_estimator`` in k1|k2|k3|abs against ``ref_logprobs``). temperature: > 0.
        backend: "auto" | "torch" | "triton".
    Returns:
        (loss 0-d differentiable w.r.t. hidden and weight, stats): ppo_policy_loss's stats plus ``entropy`` (0-d
        masked mean, nats), ``kl`` (0-d masked mean of the estimator, when kl_coef != 0) and the per-token
        detached ``logprobs`` and ``entropies`` (labels' shape, float32).
    Raises:
        TypeError / ValueError naming the argument; RuntimeError if the backend cannot run here.
    """
    _checks.linear_head(hidden, weight)
    vocab = weight.shape[0]
    _checks.labels_for("labels", labels, hidden, vocab, ignore_index)
    mask = _check_token_tensors("old_logprobs", old_logprobs, response_mask, advantages=advantages)
    _checks.same_shape("old_logprobs", old_logprobs, "labels", labels)
    _checks.same_device("old_logprobs", old_logprobs, "hidden", hidden)
    lo, hi, c = _check_clip(clip_eps, clip_eps_high, dual_clip)
    _check_agg(loss_agg, mask)
    temperature = _checks.positive("temperature", temperature)
    entropy_coef = _checks.in_range("entropy_coef", entropy_coef, 0.0, float("inf"))
    kl_coef = _checks.in_range("kl_coef", kl_coef, 0.0, float("inf"))
    _checks.choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("ref_logprobs: required when kl_coef > 0")
        _check_token_tensors("old_logprobs", old_logprobs, response_mask, ref_logprobs=ref_logprobs)
    if bool((mask & (labels == ignore_index)).any()):
        raise ValueError("labels: ignore_index at a position where response_mask is true")
    backend = resolve(backend, "linear_ppo_loss", hidden.device, ("torch", "triton"))

    shape = labels.shape
    m1 = mask.reshape(-1)
    rows = ValidRows(m1)  # tokens outside the mask cost nothing: the backends see the valid ones only
    m1, w1 = rows.take(m1), rows.take(agg_weights(mask, loss_agg).reshape(-1))
    old1, adv1 = rows.take(old_logprobs.reshape(-1).detach()), rows.take(advantages.reshape(-1).detach())
    ref1 = rows.take(ref_logprobs.reshape(-1).detach()) if kl_coef > 0 else None

    def token_loss_fn(lp: Tensor, ent: Tensor | None, start: int, end: int) -> Tensor:
        # Per-token separable: token t's term depends on lp[t], ent[t] only (the backends rely on it).
        m = m1[start:end]
        per_token = policy_token_loss(lp, old1[start:end].float(), adv1[start:end].float(), lo, hi, c)[0]
        if entropy_coef:
            per_token = per_token - entropy_coef * ent
        if kl_coef:
            per_token = per_token + kl_coef * kl_penalty(lp, ref1[start:end].float(), kl_estimator)
        return (torch.where(m, per_token, 0) * w1[start:end]).sum()

    h2 = rows.take(hidden.reshape(-1, hidden.shape[-1]))
    l1 = torch.where(m1, rows.take(labels.reshape(-1)), ignore_index)  # (all-masked case: nothing was taken)
    if backend == "triton":
        from . import _triton

        loss, logprobs, entropy = _triton.fused_linear_loss(h2.contiguous(), weight.contiguous(), l1, None, temperature, ignore_index, token_loss_fn, True, chunk_size)
    else:
        chunk = _chunk_size(chunk_size, vocab, hidden.device)
        loss, logprobs, entropy = _torch.fused_linear_loss(h2, weight, l1, None, temperature, ignore_index, token_loss_fn, True, chunk)
    logprobs, entropy = rows.put(logprobs).view(shape), rows.put(entropy).view(shape)
    with torch.no_grad():
        _, ratio, log_ratio, is_clipped, is_dual = policy_token_loss(logprobs, old_logprobs.float(), advantages.float(), lo, hi, c)
        stats = _policy_stats(ratio, log_ratio, is_clipped, is_dual, mask, c)
        stats["entropy"] = masked_mean(entropy, mask)
        if kl_coef > 0:
            stats["kl"] = masked_mean(kl_penalty(logprobs, ref_logprobs.float(), kl_estimator), mask)
        stats["logprobs"], stats["entropies"] = logprobs, entropy
    return loss, stats

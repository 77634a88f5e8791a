"""PPO clipped losses (Schulman et al. 2017), with dual-clip (Ye et al. 2020) and asymmetric clipping, and the
policy-gradient relatives that share their loop: CISPO, SAPO, GSPO's sequence ratio, Dr.GRPO's aggregation."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _checks, _library
from ._backend import resolve
from ._rows import ValidRows
from .kl import KL_ESTIMATORS, kl_penalty
from .logprobs import _chunk_size, _transform, linear_logprobs
from .masked import masked_mean

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
POLICY_LOSSES = ("ppo_clip", "cispo", "sapo")
IMPORTANCE_RATIOS = ("token", "sequence")
_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: beyond any real ratio, and keeps -A * ratio finite (no 0 * inf = NaN)
_LOSS_DTYPES = (torch.float32, torch.float64)


def agg_weights(mask: Tensor, loss_agg: str, dtype: torch.dtype = torch.float32, loss_norm_length: int | None = None,
                normalizer: float | Tensor | None = None) -> Tensor:
    """Per-token weights w with loss = sum(w * per_token_loss) for each ``loss_agg``.

    "token-mean": 1 / (number of valid tokens). "seq-mean-token-mean": 1 / (row's valid tokens x rows with any).
    "seq-mean-token-sum": 1 / (rows with any valid token). "seq-mean-token-sum-norm": 1 / (B x L), B the number
    of rows (all of them), L = ``loss_norm_length`` or T: a constant, whatever the valid counts (Dr.GRPO).
    Rows are the leading dims, tokens the last one. ``normalizer`` (token-mean and seq-mean-token-sum-norm only)
    replaces that denominator: e.g. the valid tokens of the whole batch across micro-batches and ranks (DAPO).
    """
    m = mask.to(dtype)
    if normalizer is not None:
        return m / (normalizer.to(dtype) if isinstance(normalizer, Tensor) else normalizer)
    if loss_agg == "token-mean":
        return m / m.sum().clamp(min=1)
    if loss_agg == "seq-mean-token-sum-norm":
        length = mask.shape[-1] if loss_norm_length is None else loss_norm_length
        return m / max(math.prod(mask.shape[:-1]) * length, 1)
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


def _check_agg(loss_agg, mask, loss_norm_length=None, normalizer=None):
    _checks.choice("loss_agg", loss_agg, LOSS_AGGS)
    if normalizer is not None:
        if loss_agg not in ("token-mean", "seq-mean-token-sum-norm"):
            raise ValueError(f"normalizer: replaces the denominator of loss_agg token-mean or seq-mean-token-sum-norm, not {loss_agg!r}")
        if isinstance(normalizer, Tensor):
            if normalizer.dim() != 0 or not normalizer.is_floating_point() and normalizer.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"normalizer: expected a number or a 0-d tensor, got shape {tuple(normalizer.shape)} {normalizer.dtype}")
            if normalizer.device != mask.device:
                raise ValueError(f"normalizer: expected device {mask.device}, got {normalizer.device}")
        elif isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) or not -math.inf < normalizer < math.inf or normalizer <= 0:
            raise ValueError(f"normalizer: expected a finite number > 0 (a count of tokens or sequences), got {normalizer!r}")
    if loss_agg != "token-mean" and mask.dim() < 2:
        raise ValueError(f"loss_agg: {loss_agg!r} needs [B, T] inputs (sequences), got shape {tuple(mask.shape)}")
    if loss_norm_length is not None and (isinstance(loss_norm_length, bool) or not isinstance(loss_norm_length, int) or loss_norm_length < 1):
        raise ValueError(f"loss_norm_length: expected None or an int >= 1, got {loss_norm_length!r}")


class PolicyLossConfig(NamedTuple):
    """The validated surrogate settings shared by the per-token loss, the stats and the fused callback."""

    kind: str  # "ppo_clip" | "cispo" | "sapo"
    importance_ratio: str  # "token" | "sequence"
    clip_lo: float
    clip_hi: float
    dual_clip: float | None
    tau_pos: float
    tau_neg: float


def _check_policy(policy_loss, importance_ratio, clip_eps, clip_eps_high, dual_clip, sapo_tau_pos, sapo_tau_neg, mask) -> PolicyLossConfig:
    _checks.choice("policy_loss", policy_loss, POLICY_LOSSES)
    _checks.choice("importance_ratio", importance_ratio, IMPORTANCE_RATIOS)
    lo, hi, c = _check_clip(clip_eps, clip_eps_high, dual_clip)
    if c is not None and policy_loss != "ppo_clip":
        raise ValueError(f"dual_clip: only for policy_loss='ppo_clip' (cispo's weight is clipped already, sapo has no "
                         f"clip), got policy_loss={policy_loss!r}")
    tau_pos = _checks.positive("sapo_tau_pos", sapo_tau_pos)
    tau_neg = _checks.positive("sapo_tau_neg", sapo_tau_neg)
    if importance_ratio == "sequence" and mask.dim() < 2:
        raise ValueError(f"importance_ratio: 'sequence' needs [B, T] inputs (sequences), got shape {tuple(mask.shape)}")
    return PolicyLossConfig(policy_loss, importance_ratio, lo, hi, c, tau_pos, tau_neg)


def _check_kl(ref_logprobs, kl_coef, kl_estimator, kl_log_ratio_clip, ref_name, ref, response_mask, check=None):
    kl_coef = _checks.in_range("kl_coef", kl_coef, 0.0, float("inf"))
    _checks.choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    clip = _checks.positive("kl_log_ratio_clip", kl_log_ratio_clip, allow_none=True)
    if kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("ref_logprobs: required when kl_coef > 0")
        _check_token_tensors(ref_name, ref, response_mask, check, ref_logprobs=ref_logprobs)
    return kl_coef, clip


def importance_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, importance_ratio: str) -> Tensor:
    """log of the importance ratio at each token, clamped to +-20: per token, or the row's (GSPO) repeated."""
    token = logprobs - old_logprobs
    if importance_ratio == "token":
        return token.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    # GSPO eq. 7: log s_i = mean over the row's valid tokens of the token log-ratios (where: no 0 * inf from holes)
    seq = torch.where(mask, token, 0).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return seq.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).expand_as(token)


def policy_token_loss(logprobs: Tensor, log_ratio: Tensor, advantages: Tensor, cfg: PolicyLossConfig):
    """Per-token surrogate loss; returns (loss, ratio, clipped, dual_clipped). Depends on token t's values only."""
    ratio = torch.exp(log_ratio)
    none = torch.zeros_like(ratio, dtype=torch.bool)
    if cfg.kind == "cispo":
        weight = ratio.clamp(1.0 - cfg.clip_lo, 1.0 + cfg.clip_hi)
        # stop-gradient on the weight: every token keeps its REINFORCE gradient -w A dlogp, clipped or not
        return -weight.detach() * advantages * logprobs, ratio, weight != ratio, none
    if cfg.kind == "sapo":
        tau = torch.full_like(advantages, cfg.tau_neg).masked_fill(advantages > 0, cfg.tau_pos)
        return -advantages * torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau), ratio, none, none
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cfg.clip_lo, 1.0 + cfg.clip_hi)
    loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    is_dual = none
    if cfg.dual_clip is not None:
        bound = -advantages * cfg.dual_clip
        is_dual = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
    return loss, ratio, is_clipped, is_dual


def token_loss(logprobs: Tensor, log_ratio: Tensor, advantages: Tensor, mask: Tensor, cfg: PolicyLossConfig,
               ref_logprobs: Tensor | None, kl_coef: float, kl_estimator: str, kl_clip: float | None) -> tuple[Tensor, Tensor | None]:
    """(surrogate + kl_coef * KL per token, the KL term or None): the one per-token definition behind
    :func:`ppo_policy_loss` and the fused :func:`linear_ppo_loss` (through :func:`chunk_loss_fn`)."""
    loss = policy_token_loss(logprobs, log_ratio, advantages, cfg)[0]
    if kl_coef <= 0:
        return loss, None
    # masked positions get log r = 0: garbage there cannot become inf * 0 = NaN in the gradient
    kl = kl_penalty(logprobs, torch.where(mask, ref_logprobs, logprobs.detach()), kl_estimator, log_ratio_clip=kl_clip)
    return loss + kl_coef * kl, kl


def chunk_loss_fn(mask: Tensor, weights: Tensor, advantages: Tensor, old_logprobs: Tensor | None, ref_logprobs: Tensor | None,
                  cfg: PolicyLossConfig, entropy_coef: float, kl_coef: float, kl_estimator: str, kl_clip: float | None):
    """The fused backends' callback for importance_ratio="token": (lp, ent, start, end) -> the loss of tokens
    [start, end), sum of weights * (token_loss - entropy_coef * ent) over the mask. Token tensors [N] (float32,
    mask bool); old_logprobs None: on-policy. Token t's term depends on lp[t], ent[t] only (the backends rely on it)."""

    def loss_fn(lp: Tensor, ent: Tensor | None, start: int, end: int) -> Tensor:
        r = slice(start, end)
        m = mask[r]
        old = lp.detach() if old_logprobs is None else old_logprobs[r]  # on-policy: ratio 1, with its gradient
        ref = None if ref_logprobs is None else ref_logprobs[r]
        per_token = token_loss(lp, importance_log_ratio(lp, old, m, "token"), advantages[r], m, cfg, ref, kl_coef, kl_estimator, kl_clip)[0]
        if entropy_coef:
            per_token = per_token - entropy_coef * ent
        return _aggregate(per_token, m, weights[r])

    return loss_fn


def _policy_stats(logprobs, old_logprobs, advantages, mask, cfg: PolicyLossConfig) -> dict[str, Tensor]:
    with torch.no_grad():
        log_ratio = importance_log_ratio(logprobs, old_logprobs, mask, cfg.importance_ratio)
        _, ratio, is_clipped, is_dual = policy_token_loss(logprobs, log_ratio, advantages, cfg)
        token_log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        ratio_max = torch.where(mask, ratio, float("-inf")).max() if ratio.numel() else ratio.new_zeros(())
        stats = {
            "clipfrac": masked_mean(is_clipped.float(), mask),
            # k3 of KL(old || new) per token, samples from old (whatever the ratio level of the loss)
            "approx_kl": masked_mean(torch.expm1(token_log_ratio) - token_log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(mask.any(), ratio_max, 0.0),
        }
        if cfg.dual_clip is not None:
            stats["dual_clipfrac"] = masked_mean(is_dual.float(), mask)
    return stats


def _check_token_tensors(ref_name: str, ref: Tensor, response_mask, check: bool | None = None, **tensors) -> Tensor:
    _checks.float_tensor(ref_name, ref, dtypes=_LOSS_DTYPES)
    for name, x in tensors.items():
        _checks.float_tensor(name, x, dtypes=_LOSS_DTYPES)
        _checks.same_shape(name, x, ref_name, ref)
        _checks.same_device(name, x, ref_name, ref)
    return _checks.mask("response_mask", response_mask, ref_name, ref, check)


def _per_token_advantages(advantages: Tensor, shape: torch.Size) -> Tensor:
    """[B] or [B, 1] sequence advantages (GRPO-style) as [B, T]; a [B, T] tensor as it is; anything else an error."""
    _checks.float_tensor("advantages", advantages, dtypes=_LOSS_DTYPES)
    if advantages.shape == shape:
        return advantages
    if len(shape) == 2 and advantages.shape in ((shape[0],), (shape[0], 1)):
        return advantages.reshape(shape[0], 1).expand(shape)
    raise ValueError(f"advantages: expected shape {tuple(shape)} (per token), ({shape[0] if shape else '?'},) or "
                     f"({shape[0] if shape else '?'}, 1) (per sequence), got {tuple(advantages.shape)}")


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    loss_agg: str = "token-mean",
    policy_loss: str = "ppo_clip",
    importance_ratio: str = "token",
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    loss_norm_length: int | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_log_ratio_clip: float | None = 20.0,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy-gradient surrogate loss (PPO and relatives), negated for minimisation, plus an optional in-loss KL.

    Importance ratio r: ``importance_ratio="token"``: r_t = exp(logprobs_t - old_logprobs_t); "sequence" (GSPO,
    Zheng et al. 2025, eq. 7): s_i = exp(mean over row i's valid tokens of (logprobs - old_logprobs)), used at
    every token of the row (as TRL's and Liger-Kernel's importance_sampling_level="sequence"). Log-ratios are
    clamped to +-20 so that no 0 * inf NaN arises. Per-token loss with advantage A:

    - "ppo_clip" (Schulman et al. 2017, eq. 7): max(-A r, -A clip(r, 1 - clip_eps, 1 + (clip_eps_high or clip_eps)))
      (asymmetric "clip-higher" as in DAPO, Yu et al. 2025); with ``dual_clip=c`` (c > 1) tokens with A < 0 take
      min(that, -A c) (Ye et al. 2020). With "sequence" and A constant over each row, loss_agg="seq-mean-token-mean"
      gives GSPO's objective (eq. 5) exactly.
    - "cispo" (MiniMax-M1 report, Chen et al. 2025, eq. 4-5): -sg(clip(r, 1 - clip_eps, 1 + (clip_eps_high or
      clip_eps))) A logprobs: the clipped weight carries no gradient, so clipped tokens keep the gradient
      -w A dlogp instead of none. Bounds as verl's (both sides); the paper sets no lower bound (clip_eps=1.0 does
      that), and TRL's cap ``epsilon_high`` (an absolute weight, e.g. 5.0) is clip_eps_high = cap - 1. The value
      is a surrogate (its size follows logprobs); only its gradient means something.
    - "sapo" (Gao et al. 2025, "Soft Adaptive Policy Optimization", the J_SAPO objective): -A f(r) with the gate
      f(r) = sigmoid(tau (r - 1)) 4 / tau, tau = sapo_tau_pos where A > 0 else sapo_tau_neg (TRL's defaults
      1.0 / 1.05). df/dr = 4 sigmoid (1 - sigmoid) is 1 at r = 1: on-policy the gradient is the unclipped one.

    KL: with ``kl_coef > 0`` adds kl_coef * kl_penalty(logprobs, ref_logprobs, kl_estimator,
    log_ratio_clip=kl_log_ratio_clip) per token (GRPO's KL in the loss), aggregated like the rest. The clamp is on
    by default (+-20 nats): k3 is unbounded otherwise; beyond it the KL gradient is 0.

    Args:
        logprobs, old_logprobs, advantages: [B, T] (or any shape for "token-mean" with importance_ratio="token")
            float32/float64, nats. ref_logprobs: same (required when kl_coef > 0). ``old_logprobs=None``: on-policy
            (GRPO with one update per rollout), ratio = exp(logprobs - logprobs.detach()): 1 in value, with the
            ratio's gradient. ``advantages`` may also be per sequence, [B] or [B, 1] with [B, T] log-probs
            (broadcast over the row's tokens).
        response_mask: bool or 0/1, same shape. loss_agg: "token-mean" (sum over valid tokens / their count),
            "seq-mean-token-mean" (mean over rows with a valid token of each row's token mean),
            "seq-mean-token-sum" (mean over those rows of each row's token sum), "seq-mean-token-sum-norm"
            (Dr.GRPO, Liu et al. 2025; TRL's loss_type="dr_grpo": sum over all valid tokens / (B x L), B the number
            of rows, L = loss_norm_length or T = response_mask.shape[-1]: pass the generation's max length so
            that the constant does not change with the batch). Rows are the leading dims.
        policy_loss: "ppo_clip" | "cispo" | "sapo". importance_ratio: "token" | "sequence".
        clip_eps, clip_eps_high: > 0 (unused by "sapo"). dual_clip: None or > 1, "ppo_clip" only.
        sapo_tau_pos, sapo_tau_neg: > 0 ("sapo" only). loss_norm_length: None or int >= 1 (used by
        "seq-mean-token-sum-norm" only). kl_coef >= 0; kl_estimator in k1|k2|k3|abs; kl_log_ratio_clip: None or > 0.
        normalizer: None, or > 0 (a number or a 0-d tensor: no host sync): with "token-mean" or
            "seq-mean-token-sum-norm", the loss is the weighted sum over valid tokens / normalizer instead of this
            call's own count (DAPO's token-level loss over a whole batch split into micro-batches and ranks: pass
            the global valid-token count, and micro-batch gradients add up to the batch's).
    Returns:
        (loss 0-d, stats) with stats 0-d detached tensors: clipfrac (tokens whose ratio was clipped; for "cispo"
        whose weight was clipped; always 0 for "sapo", which does not clip), approx_kl (k3 of the per-token
        ratios), ratio_mean, ratio_max (of the ratio in use: with "sequence" the row's, over its tokens), with
        dual_clip dual_clipfrac, with kl_coef > 0 kl (masked mean of the clamped estimator). No host
        synchronisation. 0 when no token is valid.
    Raises:
        TypeError / ValueError naming the argument (clip_eps <= 0, dual_clip <= 1 or with cispo/sapo, unknown
        policy_loss / importance_ratio / loss_agg, "sequence" or a seq-* loss_agg on 1-D inputs,
        loss_norm_length < 1, taus <= 0, ref_logprobs missing when kl_coef > 0, ...).
    """
    _checks.float_tensor("logprobs", logprobs, dtypes=_LOSS_DTYPES)
    advantages = _per_token_advantages(advantages, logprobs.shape)
    old_logprobs = logprobs.detach() if old_logprobs is None else old_logprobs
    mask = _check_token_tensors("logprobs", logprobs, response_mask, old_logprobs=old_logprobs, advantages=advantages)
    cfg = _check_policy(policy_loss, importance_ratio, clip_eps, clip_eps_high, dual_clip, sapo_tau_pos, sapo_tau_neg, mask)
    _check_agg(loss_agg, mask, loss_norm_length, normalizer)
    kl_coef, kl_clip = _check_kl(ref_logprobs, kl_coef, kl_estimator, kl_log_ratio_clip, "logprobs", logprobs, response_mask)
    log_ratio = importance_log_ratio(logprobs, old_logprobs, mask, importance_ratio)
    loss_t, kl_t = token_loss(logprobs, log_ratio, advantages, mask, cfg, ref_logprobs, kl_coef, kl_estimator, kl_clip)
    loss = _aggregate(loss_t, mask, agg_weights(mask, loss_agg, loss_t.dtype, loss_norm_length, normalizer))
    stats = _policy_stats(logprobs.detach(), old_logprobs, advantages, mask, cfg)
    if kl_t is not None:
        stats["kl"] = masked_mean(kl_t.detach(), mask)
    return loss, stats


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    *,
    clip_eps: float = 0.2,
    loss_agg: str = "token-mean",
    loss_norm_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: 1/2 max((V - R)^2, (old_V + clip(V - old_V, -eps, eps) - R)^2) (as in OpenAI's PPO2 baselines).

    Args:
        values, old_values, returns: same-shape float32/float64; response_mask: bool or 0/1; loss_agg and
        loss_norm_length as in :func:`ppo_policy_loss`.
    Returns:
        (loss 0-d, {"vf_clipfrac": fraction of valid tokens where the clip is active, |V - old_V| > eps, and the clipped
        term is the larger: where clipping changed the loss; inside the clip range the two terms differ by rounding only}).
    Raises:
        TypeError / ValueError naming the argument.
    """
    mask = _check_token_tensors("values", values, response_mask, old_values=old_values, returns=returns)
    eps = _checks.positive("clip_eps", clip_eps)
    _check_agg(loss_agg, mask, loss_norm_length)
    clipped_values = old_values + (values - old_values).clamp(-eps, eps)
    unclipped_err = (values - returns).square()
    clipped_err = (clipped_values - returns).square()
    loss = _aggregate(0.5 * torch.maximum(unclipped_err, clipped_err), mask, agg_weights(mask, loss_agg, values.dtype, loss_norm_length))
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((((values - old_values).abs() > eps) & (clipped_err > unclipped_err)).to(values.dtype), mask)}
    return loss, stats


def linear_ppo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logprobs: Tensor | None,
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
    kl_log_ratio_clip: float | None = 20.0,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    loss_agg: str = "token-mean",
    loss_norm_length: int | None = None,
    policy_loss: str = "ppo_clip",
    importance_ratio: str = "token",
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    normalizer: float | Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_size: int | None = None,
    check_inputs: bool | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Single-pass policy loss straight from hidden states: log-probs, entropy, loss and gradients together.

    Equals ``ppo_policy_loss(linear_logprobs(hidden, weight, labels, bias=..., temperature=..., logit_scale=...,
    softcap=...), old_logprobs, advantages,
    response_mask, ...)[0] - entropy_coef * agg(entropy)`` (with its in-loss KL: + kl_coef * agg(kl_penalty(
    logprobs, ref_logprobs, kl_estimator, log_ratio_clip=kl_log_ratio_clip))) in value and gradient (agg as
    ``loss_agg``). With importance_ratio="token" every variant is per-token separable: dloss/dlogprob is known as
    soon as a chunk's log-probs are, so the gradients are formed in the forward pass: forward + backward cost 3
    matmul passes over N x H x V instead of 4; backward only scales them. With importance_ratio="sequence" (GSPO)
    a token's gradient depends on its whole row's ratio, which no single chunk holds: the loss is then computed
    as ``linear_logprobs`` (autograd, 4 matmul passes: 2 forward, 2 backward) followed by ``ppo_policy_loss``.

    Precision, torch.compile and host syncs as in :func:`linear_logprobs`: hidden, weight and bias may each be
    float32/bfloat16/float16 on their own; fp32 compute whatever the inputs and the ambient autocast; float32
    loss and stats, gradients in their inputs' dtypes. The single-pass route is the custom op
    ``rlhf_fast::linear_ppo_loss``.

    Args:
        hidden: [B, T, H] (or [..., H]) float32/bfloat16/float16; weight: [V, H] float32/bfloat16/float16; bias:
            optional [V] float32/bfloat16/float16; all on one device.
        labels: hidden's leading shape, int64 in [0, V) or ignore_index; positions outside response_mask are ignored.
        old_logprobs, advantages (and ref_logprobs when kl_coef != 0): float32/float64, labels' shape, nats.
            ``old_logprobs=None``: on-policy (ratio 1 with its gradient; no extra head pass). ``advantages`` may be
            per sequence, [B] or [B, 1] with [B, T] labels.
        response_mask: bool or 0/1, labels' shape; every valid position needs a valid label.
        clip_eps, clip_eps_high, dual_clip, loss_agg, loss_norm_length, normalizer, policy_loss, importance_ratio,
            sapo_tau_pos, sapo_tau_neg, kl_log_ratio_clip: as in :func:`ppo_policy_loss` ("sequence" and the
            seq-* aggregations need [B, T] inputs).
        entropy_coef: >= 0 weight of the entropy bonus. kl_coef: >= 0 weight of the in-loss KL penalty
            (estimator ``kl_estimator`` in k1|k2|k3|abs against ``ref_logprobs``).
        temperature: > 0; logit_scale: finite > 0; softcap: None or finite > 0: the logit transform of
            :func:`linear_logprobs`, z = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap) / temperature
            (there: which model setting maps to which argument).
        backend: "auto" | "torch" | "triton".
        check_inputs: None | True | False: how the values of labels and response_mask (0/1, no ignore_index
            inside) are checked (see :func:`linear_logprobs`).
    Returns:
        (loss 0-d differentiable w.r.t. hidden, weight and bias, stats): ppo_policy_loss's stats plus ``entropy`` (0-d
        masked mean, nats), ``kl`` (0-d masked mean of the clamped estimator, when kl_coef != 0) and the per-token
        detached ``logprobs`` and ``entropies`` (labels' shape, float32).
    Raises:
        TypeError / ValueError naming the argument; RuntimeError if the backend cannot run here (or for bad
        label / mask values, when asserted on the device).
    """
    _checks.linear_head(hidden, weight, bias)
    vocab = weight.shape[0]
    _checks.labels_for("labels", labels, hidden, vocab, ignore_index, check_inputs)
    advantages = _per_token_advantages(advantages, labels.shape)
    on_policy = old_logprobs is None
    mask = _check_token_tensors("advantages", advantages, response_mask, check_inputs, **({} if on_policy else {"old_logprobs": old_logprobs}))
    _checks.same_shape("advantages", advantages, "labels", labels)
    _checks.same_device("advantages", advantages, "hidden", hidden)
    cfg = _check_policy(policy_loss, importance_ratio, clip_eps, clip_eps_high, dual_clip, sapo_tau_pos, sapo_tau_neg, mask)
    _check_agg(loss_agg, mask, loss_norm_length, normalizer)
    tf = _transform(temperature, logit_scale, softcap)
    entropy_coef = _checks.in_range("entropy_coef", entropy_coef, 0.0, float("inf"))
    kl_coef, kl_clip = _check_kl(ref_logprobs, kl_coef, kl_estimator, kl_log_ratio_clip, "advantages", advantages, response_mask,
                                 check_inputs)
    msg = "labels: ignore_index at a position where response_mask is true"
    if check_inputs is not False and _checks.any_bad(check_inputs, mask & (labels == ignore_index), msg):
        raise ValueError(msg)
    backend = resolve(backend, "linear_ppo_loss", hidden.device, ("torch", "triton"))
    chunk = _chunk_size(chunk_size, vocab, hidden.device, softcap is not None, backend)
    if importance_ratio == "sequence":
        return _sequence_ratio_loss(hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, cfg, entropy_coef,
                                    kl_coef, kl_estimator, kl_clip, (temperature, logit_scale, softcap), loss_agg,
                                    loss_norm_length, normalizer, ignore_index, backend, chunk)

    shape = labels.shape
    m1 = mask.reshape(-1)
    rows = ValidRows(m1)  # tokens outside the mask cost nothing: the backends see the valid ones only (where free)

    def tokens(x: Tensor | None) -> Tensor | None:  # [N] float32 constants of the loss, valid rows only
        return None if x is None else rows.take(x.detach().reshape(-1).float())

    w1 = tokens(agg_weights(mask, loss_agg, loss_norm_length=loss_norm_length, normalizer=normalizer))
    m1 = rows.take(m1)
    l1 = torch.where(m1, rows.take(labels.reshape(-1)), ignore_index)
    loss, logprobs, entropy = _library.linear_ppo_loss(
        rows.take(hidden.reshape(-1, hidden.shape[-1])), weight, bias, l1, m1, w1, tokens(advantages), tokens(old_logprobs),
        tokens(ref_logprobs) if kl_coef > 0 else None, cfg, entropy_coef, kl_coef, kl_estimator, kl_clip, tf, ignore_index,
        chunk, backend)
    logprobs, entropy = rows.put(logprobs).view(shape), rows.put(entropy).view(shape)
    with torch.no_grad():
        stats = _policy_stats(logprobs, logprobs if on_policy else old_logprobs.float(), advantages.float(), mask, cfg)
        stats["entropy"] = masked_mean(entropy, mask)
        if kl_coef > 0:
            ref = torch.where(mask, ref_logprobs.float(), logprobs)
            stats["kl"] = masked_mean(kl_penalty(logprobs, ref, kl_estimator, log_ratio_clip=kl_clip), mask)
        stats["logprobs"], stats["entropies"] = logprobs, entropy
    return loss, stats


def _sequence_ratio_loss(hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, cfg, entropy_coef,
                         kl_coef, kl_estimator, kl_clip, transform, loss_agg, loss_norm_length, normalizer, ignore_index,
                         backend, chunk):
    """linear_ppo_loss for importance_ratio="sequence": log-probs by autograd, then the composed loss."""
    temperature, logit_scale, softcap = transform
    lp, ent = linear_logprobs(hidden, weight, torch.where(mask, labels, ignore_index), bias=bias, temperature=temperature,
                              logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index, return_entropy=True,
                              backend=backend, chunk_size=chunk, check_inputs=False)  # checked by the caller
    # float32 throughout, as the single-pass path computes its per-token terms
    loss, stats = ppo_policy_loss(
        lp, None if old_logprobs is None else old_logprobs.detach().float(), advantages.detach().float(), mask,
        clip_eps=cfg.clip_lo, clip_eps_high=cfg.clip_hi,
        dual_clip=cfg.dual_clip, loss_agg=loss_agg, policy_loss=cfg.kind, importance_ratio=cfg.importance_ratio,
        sapo_tau_pos=cfg.tau_pos, sapo_tau_neg=cfg.tau_neg, loss_norm_length=loss_norm_length,
        ref_logprobs=None if ref_logprobs is None else ref_logprobs.detach().float(), kl_coef=kl_coef,
        kl_estimator=kl_estimator, kl_log_ratio_clip=kl_clip, normalizer=normalizer)
    if entropy_coef:
        loss = loss - entropy_coef * _aggregate(ent, mask, agg_weights(mask, loss_agg, ent.dtype, loss_norm_length, normalizer))
    with torch.no_grad():
        stats["entropy"] = masked_mean(ent, mask)
        stats["logprobs"], stats["entropies"] = lp.detach(), ent.detach()
    return loss, stats

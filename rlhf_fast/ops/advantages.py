"""Critic-free advantage estimators: group/leave-one-out/greedy baselines on sequence scores, and REINFORCE++.

Pure tensor functions (CPU or CUDA), vectorised over the batch. Statistics are accumulated in float64 and the
result is returned in the input dtype. Advantages are targets: outputs are detached (not differentiable).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _checks, _dist

OUTCOME_ESTIMATORS = ("grpo", "rloo", "reinforce", "remax")
REINFORCE_BASELINES = ("none", "batch_mean")
_SCORE_DTYPES = (torch.float32, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _eps(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"eps: expected a finite number >= 0, got {v!r}")
    return float(v)


def _finite_where(name: str, x: Tensor, valid: Tensor, what: str) -> None:
    if not bool((torch.isfinite(x) | ~valid).all()):
        raise ValueError(f"{name}: non-finite entries at {what}")


def outcome_advantages(
    scores: Tensor,
    group_ids: Tensor | None,
    *,
    estimator: str = "grpo",
    norm_adv_by_std: bool = True,
    eps: float = 1e-6,
    baseline: str = "none",
    baseline_scores: Tensor | None = None,
    valid: Tensor | None = None,
    process_group=None,
) -> Tensor:
    """Per-sequence advantages from outcome (sequence-level) scores; the caller broadcasts them over response tokens.

    With a group = the valid rows sharing a group id (samples of one prompt), k its size and mean_g its mean:

    - "grpo" (Shao et al. 2024, DeepSeekMath, sec. 4.1.2): A_i = (r_i - mean_g) / (std_g + eps), std_g the
      unbiased (k - 1) std, as verl and TRL compute it (torch.std). With ``norm_adv_by_std=False``:
      A_i = r_i - mean_g (Dr.GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training").
    - "rloo" (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics", sec. 3.2): A_i = r_i - mean_{j != i} r_j
      = k / (k - 1) * (r_i - mean_g).
    - "reinforce" (Williams 1992): A_i = r_i, or r_i - (mean of the valid scores of the batch) with
      ``baseline="batch_mean"``. group_ids are not used (may be None).
    - "remax" (Li et al. 2023, "ReMax", Alg. 1): A_i = r_i - baseline_scores_i, the score of the greedy response
      to the same prompt. group_ids are not used (may be None).

    Edge cases (defined, never NaN/inf): a group of 1 valid row gets A = 0 (no baseline information; verl instead
    keeps r_i); a group whose valid scores are all equal gets exactly A = 0 (std 0) for "grpo" and "rloo".

    Args:
        scores: [B] float32/float64 sequence scores.
        group_ids: [B] integer tensor (any ids, unsorted, non-contiguous), same device; required for grpo/rloo.
        estimator: "grpo" | "rloo" | "reinforce" | "remax".
        norm_adv_by_std: grpo only: divide by the group std (False: Dr.GRPO).
        eps: >= 0, added to the group std (grpo).
        baseline: reinforce only: "none" | "batch_mean".
        baseline_scores: [B], scores' dtype and device; required by "remax", rejected by the others.
        valid: optional [B] bool or 0/1; rows with valid=False (filtered samples) take part in no statistic and
            get A = 0; their scores are never read (may be NaN).
        process_group: reinforce only: a ``torch.distributed`` group whose ranks each hold a share of the batch;
            ``baseline="batch_mean"`` is then the mean over every rank's valid scores (every rank must call).
            Groups (grpo, rloo) and greedy baselines (remax) are per row or per group: keep a group's rows on
            one rank; those estimators refuse a group.
    Returns:
        [B] advantages, scores' dtype and device.
    Raises:
        TypeError / ValueError naming the argument: dims/shape/device/dtype mismatch, non-integer group_ids,
        unknown estimator or baseline, eps < 0, non-finite scores/baseline_scores at valid rows, baseline_scores
        missing for remax or given for another estimator, process_group given to another estimator than reinforce.
    """
    _checks.float_tensor("scores", scores, ndim=1, dtypes=_SCORE_DTYPES)
    _checks.choice("estimator", estimator, OUTCOME_ESTIMATORS)
    pg = _dist.check_group(process_group)
    if pg is not None and estimator != "reinforce":
        raise ValueError(f"process_group: {estimator!r} has no batch statistic (its baselines are per group or per row: "
                         "keep a group's rows on one rank and pass None)")
    _checks.choice("baseline", baseline, REINFORCE_BASELINES)
    if baseline != "none" and estimator != "reinforce":
        raise ValueError(f"baseline: only used by estimator='reinforce', got {baseline!r} with {estimator!r}")
    if not isinstance(norm_adv_by_std, bool):
        raise TypeError(f"norm_adv_by_std: expected a bool, got {type(norm_adv_by_std).__name__}")
    eps = _eps(eps)
    grouped = estimator in ("grpo", "rloo")
    if group_ids is None:
        if grouped:
            raise ValueError(f"group_ids: required by estimator={estimator!r}")
    else:
        _checks.tensor("group_ids", group_ids, ndim=1)
        if group_ids.dtype not in _INT_DTYPES:
            raise TypeError(f"group_ids: expected an integer dtype (int64), got {_checks._dt(group_ids.dtype)}")
        _checks.same_shape("group_ids", group_ids, "scores", scores)
        _checks.same_device("group_ids", group_ids, "scores", scores)
    if estimator == "remax":
        if baseline_scores is None:
            raise ValueError("baseline_scores: required by estimator='remax' (the greedy response's scores)")
        _checks.float_tensor("baseline_scores", baseline_scores, ndim=1, dtypes=_SCORE_DTYPES)
        _checks.same_shape("baseline_scores", baseline_scores, "scores", scores)
        _checks.same_device("baseline_scores", baseline_scores, "scores", scores)
        _checks.same_dtype("baseline_scores", baseline_scores, "scores", scores)
    elif baseline_scores is not None:
        raise ValueError(f"baseline_scores: only used by estimator='remax', not {estimator!r}")
    ok = torch.ones_like(scores, dtype=torch.bool) if valid is None else _checks.mask("valid", valid, "scores", scores)
    _finite_where("scores", scores, ok, "valid rows")

    # where (not multiply) so that NaN scores of invalid rows never leak in.
    r = torch.where(ok, scores.detach().double(), 0.0)
    if estimator == "reinforce":
        if baseline == "batch_mean":
            total, count = _dist.reduce([r.sum(), ok.sum()], pg)
            r = r - total / count.clamp(min=1)
        return torch.where(ok, r, 0.0).to(scores.dtype)
    if estimator == "remax":
        _finite_where("baseline_scores", baseline_scores, ok, "valid rows")
        b = torch.where(ok, baseline_scores.detach().double(), 0.0)
        return (r - b).to(scores.dtype)

    # One slot per distinct id; torch.unique's output size forces the one unavoidable host sync.
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = uniq.numel()
    w = ok.double()
    count = r.new_zeros(n_groups).index_add_(0, inv, w)
    mean = r.new_zeros(n_groups).index_add_(0, inv, r) / count.clamp(min=1)
    centered = torch.where(ok, r - mean[inv], 0.0)
    # Rounding in the mean leaves ~1e-17 residues when all scores are equal; dividing those by a ~1e-17 std
    # would give O(1) noise, so constant groups (max == min over valid rows) are zeroed exactly.
    inf = torch.tensor(math.inf, dtype=r.dtype, device=r.device)
    gmax = torch.full_like(count, -math.inf).scatter_reduce_(0, inv, torch.where(ok, r, -inf), "amax")
    gmin = torch.full_like(count, math.inf).scatter_reduce_(0, inv, torch.where(ok, r, inf), "amin")
    k = count[inv]
    informative = ok & (k > 1) & (gmax[inv] > gmin[inv])
    if estimator == "rloo":
        adv = centered * k / (k - 1).clamp(min=1)
    elif norm_adv_by_std:
        var = r.new_zeros(n_groups).index_add_(0, inv, centered.square()) / (count - 1).clamp(min=1)
        denom = var.sqrt()[inv] + eps
        adv = centered / torch.where(denom > 0, denom, 1.0)
    else:
        adv = centered
    return torch.where(informative, adv, 0.0).to(scores.dtype)


def reinforce_pp_advantages(
    token_rewards: Tensor,
    response_mask: Tensor,
    *,
    gamma: float = 1.0,
    whiten: bool = True,
    eps: float = 1e-8,
    process_group=None,
) -> Tensor:
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning LLMs", sec. 3).

    Per row, on the valid positions t_1 < ... < t_n only: G_{t_i} = sum_{j >= i} gamma^(j - i) r_{t_j}, i.e. masked
    holes inside a response are skipped and discounting counts valid steps only; rewards at masked positions are
    never read. These are exactly the hole semantics of :func:`rlhf_fast.ops.gae` (its returns with lam = 1 and
    values = 0). Then, with ``whiten``, over all valid tokens of the batch: A = (G - mean) / (std + eps), std the
    unbiased std (as :func:`masked_whiten` and verl), taken as 0 for a single valid token; a batch whose valid
    returns are all equal (or has one valid token) gives exactly A = 0.

    The KL penalty goes into ``token_rewards`` (reward-side KL, as REINFORCE++ does), e.g.
    token_rewards = score at the last valid token - kl_coef * kl_penalty(logprobs, ref_logprobs).

    Args:
        token_rewards: [B, T] float32/float64 per-token rewards.
        response_mask: [B, T] bool or 0/1, same device.
        gamma: discount in [0, 1].
        whiten: False returns the raw returns G (masked).
        eps: >= 0, added to the std.
        process_group: a ``torch.distributed`` group whose ranks each hold a share of the batch: the whitening
            statistics (mean, std, whether all returns are equal) are then over every rank's valid tokens (every
            rank must call). None: this process's tokens only.
    Returns:
        [B, T] advantages (or returns), token_rewards' dtype; 0 where masked; all zeros if nothing is valid.
    Raises:
        TypeError / ValueError naming the argument (including non-finite token_rewards at valid positions).
    """
    _checks.float_tensor("token_rewards", token_rewards, ndim=2, dtypes=_SCORE_DTYPES)
    m = _checks.mask("response_mask", response_mask, "token_rewards", token_rewards)
    gamma = _checks.in_range("gamma", gamma, 0.0, 1.0)
    if not isinstance(whiten, bool):
        raise TypeError(f"whiten: expected a bool, got {type(whiten).__name__}")
    eps = _eps(eps)
    _finite_where("token_rewards", token_rewards, m, "valid (response_mask) positions")
    pg = _dist.check_group(process_group)

    r = torch.where(m, token_rewards.detach().double(), 0.0)
    if gamma == 1.0:
        # Undiscounted: holes add 0, so a reverse cumulative sum is the return (float64, exact up to rounding).
        ret = r.flip(-1).cumsum(-1).flip(-1)
    else:
        ret = torch.zeros_like(r)
        carry = r.new_zeros(r.shape[0])
        for t in reversed(range(r.shape[1])):
            # A hole passes the carry through undiscounted.
            carry = torch.where(m[:, t], r[:, t] + gamma * carry, carry)
            ret[:, t] = carry
    ret = torch.where(m, ret, 0.0)
    if not whiten:
        return ret.to(token_rewards.dtype)
    total, n = _dist.reduce([ret.sum(), m.sum()], pg)
    mean = total / n.clamp(min=1)
    centered = torch.where(m, ret - mean, 0.0)
    (sq,) = _dist.reduce([centered.square().sum()], pg)
    std = (sq / (n - 1).clamp(min=1)).sqrt()
    inf = torch.tensor(math.inf, dtype=ret.dtype, device=ret.device)
    hi, neg_lo = _dist.reduce([torch.where(m, ret, -inf).amax(), -torch.where(m, ret, inf).amin()] if ret.numel() else [-inf, -inf],
                              pg, "max")
    constant = hi <= -neg_lo
    denom = std + eps
    adv = centered / torch.where(denom > 0, denom, 1.0)
    return torch.where(m & ~constant, adv, 0.0).to(token_rewards.dtype)

"""Reward-model losses on scalar rewards of ranked responses.

Rewards come as ``rewards [B, K]`` (row b: the rewards of prompt b's responses, best first) with ``mask [B, K]``
marking the responses a row has (a prefix: rows may hold fewer than K) and, for rated data with ties,
``strict [B, K-1]`` saying response i is strictly preferred to response i+1. All losses are means over rows
(prompts), in nats, computed in float32 or wider; they raise ValueError naming the argument on bad shapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(rewards: Tensor, mask: Tensor | None, strict: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards: expected [B, K] with K >= 2 responses per row, got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards: expected a floating-point tensor, got {rewards.dtype}")
    B, K = rewards.shape
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool()
    if mask.shape != rewards.shape:
        raise ValueError(f"mask: expected shape {tuple(rewards.shape)}, got {tuple(mask.shape)}")
    if bool((mask.sum(-1) < 2).any()):
        raise ValueError("mask: every row needs at least 2 responses")
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("mask: each row's responses must be a prefix (True then False)")
    pair = mask[:, 1:] & mask[:, :-1]  # adjacent pairs that exist
    if strict is not None:
        if strict.shape != (B, K - 1):
            raise ValueError(f"strict: expected shape {(B, K - 1)}, got {tuple(strict.shape)}")
        pair = pair & strict.bool()
    return rewards.float() if rewards.dtype in (torch.float16, torch.bfloat16) else rewards, mask, pair


def _levels(rewards: Tensor, strict: Tensor | None) -> Tensor:
    """[B, K] preference level of each response: 0 for the best, +1 after every strict step (ties share a level)."""
    B, K = rewards.shape
    steps = torch.ones(B, K - 1, dtype=torch.long, device=rewards.device) if strict is None else strict.long()
    return torch.cat([steps.new_zeros(B, 1), steps.cumsum(-1)], dim=1)


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float | None = None) -> Tensor:
    """Pairwise Bradley-Terry loss mean(-log sigmoid(r_w - r_l - m)) (Ouyang et al. 2022, eq. 1; the margin m of
    Touvron et al. 2023, eq. 2).

    Args: chosen_rewards, rejected_rewards [B] float; margin: None, a float, or [B] (>= 0).
    Returns: 0-d tensor, nats.
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(f"chosen_rewards, rejected_rewards: expected two [B] tensors, got {tuple(chosen_rewards.shape)} "
                         f"and {tuple(rejected_rewards.shape)}")
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def pairwise_loss(rewards: Tensor, mask: Tensor | None = None, strict: Tensor | None = None,
                  margin: Tensor | float | None = None) -> Tensor:
    """Bradley-Terry over every ordered pair of a row: per row, the mean over pairs i < j (response i strictly
    better) of -log sigmoid(r_i - r_j - m), then the mean over rows (InstructGPT's K-choose-2 loss, Ouyang et al.
    2022 eq. 1). For K = 2 it is :func:`bradley_terry_loss`. ``margin`` (float or [B]) applies to every pair."""
    rewards, mask, _ = _check(rewards, mask, strict)
    B, K = rewards.shape
    # Better-than relation: i < j, both present, and some strict step between them (ties are no preference).
    level = _levels(rewards, strict)
    better = (level[:, :, None] < level[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    diff = rewards[:, :, None] - rewards[:, None, :]
    if margin is not None:
        m = margin if not isinstance(margin, Tensor) or margin.dim() == 0 else margin.view(B, 1, 1)
        diff = diff - m
    per_pair = torch.where(better, -F.logsigmoid(diff), 0.0)
    n_pairs = better.sum((1, 2))
    if bool((n_pairs == 0).any()):
        raise ValueError("strict: a row has no strictly ordered pair")
    return (per_pair.sum((1, 2)) / n_pairs).mean()


def adjacent_ranking_loss(rewards: Tensor, mask: Tensor | None = None, strict: Tensor | None = None,
                          margin: Tensor | float = 0.0) -> Tensor:
    """Ranking loss over adjacent pairs: per row sum_i -log sigmoid(r_i - r_{i+1} - margin) over the row's
    consecutive responses (tied neighbours skipped), mean over rows."""
    rewards, mask, pair = _check(rewards, mask, strict)
    if isinstance(margin, Tensor) and margin.dim() == 1:
        margin = margin[:, None]
    step = -F.logsigmoid(rewards[:, :-1] - rewards[:, 1:] - margin)
    return torch.where(pair, step, 0.0).sum(-1).mean()


def plackett_luce_loss(rewards: Tensor, mask: Tensor | None = None, strict: Tensor | None = None) -> Tensor:
    """Listwise Plackett-Luce negative log-likelihood of the ranking (Plackett 1975; Luce 1959):
    per row -sum_i [r_i - log sum_{j >= i} exp(r_j)] over the row's responses, mean over rows (the last term,
    a choice among one, is 0). Ties (``strict`` False) use Breslow's approximation: each tied response is chosen
    from everything not strictly better than it, and responses in the row's lowest level add no term."""
    rewards, mask, _ = _check(rewards, mask, strict)
    level = _levels(rewards, strict)
    lowest = torch.where(mask, level, -1).max(-1, keepdim=True).values
    K = rewards.shape[1]
    risk = (level[:, None, :] >= level[:, :, None]) & mask[:, None, :]  # risk[b, i, j]: j still in play when i is chosen
    risk = risk | torch.eye(K, dtype=torch.bool, device=rewards.device)  # padded i: a finite (unused) term, no NaN gradient
    tail = torch.logsumexp(rewards[:, None, :].expand(-1, K, -1).masked_fill(~risk, float("-inf")), dim=-1)
    chosen = mask & (level < lowest)
    return -torch.where(chosen, rewards - tail, 0.0).sum(-1).mean()


def centering_penalty(rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """Reward centering: mean over rows of (the row's mean reward)^2, which pulls each prompt's rewards to mean 0
    without shrinking their differences (Eisenstein et al. 2023, "Helping or Herding?", sec. 3; TRL's
    ``center_rewards_coefficient`` uses (r_w + r_l)^2 = 4x this for pairs). Weight it with ``loss.center_coef``."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected [B, K], got shape {tuple(rewards.shape)}")
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool()
    row_mean = torch.where(mask, rewards, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)
    return row_mean.pow(2).mean()


LOSSES = ("pairwise", "adjacent", "plackett_luce")


def ranking_loss(kind: str, rewards: Tensor, mask: Tensor | None = None, strict: Tensor | None = None,
                 margin: Tensor | float | None = None) -> Tensor:
    """Dispatch on ``kind`` in LOSSES ("pairwise" = Bradley-Terry over all ordered pairs)."""
    if kind == "pairwise":
        return pairwise_loss(rewards, mask, strict, margin)
    if kind == "adjacent":
        return adjacent_ranking_loss(rewards, mask, strict, 0.0 if margin is None else margin)
    if kind == "plackett_luce":
        return plackett_luce_loss(rewards, mask, strict)
    raise ValueError(f"kind: expected one of {', '.join(LOSSES)}, got {kind!r}")

"""Masked reductions over response tokens."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, _dist


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is true.

    Args:
        x: float tensor [...]; mask: bool or 0/1 tensor of exactly x's shape (no broadcasting).
        dim: reduce over this dim only (None: over everything).
    Returns:
        float tensor (0-d, or x's shape without ``dim``); 0 where there is no valid entry (never NaN).
    Raises:
        TypeError / ValueError naming the argument.
    """
    _checks.float_tensor("x", x, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16))
    m = _checks.mask("mask", mask, "x", x)
    total = torch.where(m, x, 0).sum(dim=dim)
    count = m.sum(dim=dim).clamp(min=1)
    return total / count


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, process_group=None) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries, var the unbiased variance: PPO's advantage
    whitening (as OpenAI baselines and TRL normalise advantages per batch).

    Args:
        x: float tensor [...] (fp32/fp64/bf16/fp16); mask: bool or 0/1 tensor of exactly x's shape.
        shift_mean: False adds the mean back (only the scale changes).
        process_group: a ``torch.distributed`` group whose ranks each hold a share of the batch: the mean and
            variance are then those of every rank's masked entries (``ops._dist``; every rank must call). None:
            this process's entries only.
    Returns:
        x's shape and dtype; 0 at masked positions.
    Raises:
        ValueError if fewer than 2 entries are valid (over the group's ranks): the variance is undefined;
        TypeError / ValueError naming the argument otherwise.
    """
    _checks.float_tensor("x", x, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16))
    m = _checks.mask("mask", mask, "x", x)
    group = _dist.check_group(process_group)
    total, count = _dist.reduce([torch.where(m, x, 0).sum(), m.sum()], group)
    n = int(count)
    if n < 2:
        raise ValueError(f"mask: masked_whiten needs at least 2 valid entries{' over the ranks' if group else ''}, got {n}")
    mean = total / n
    centered = torch.where(m, x - mean, 0)
    (sq,) = _dist.reduce([centered.square().sum()], group)
    out = centered * torch.rsqrt(sq / (n - 1) + 1e-8)
    if not shift_mean:
        out = torch.where(m, out + mean, 0)
    return out

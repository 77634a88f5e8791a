"""Masked reductions over response tokens."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks


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


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / std over the masked entries (unbiased variance), as for PPO advantages.

    With ``shift_mean=False`` the mean is added back (only the scale changes). Masked positions are 0.
    Raises ValueError if fewer than 2 entries are valid (the variance is undefined).
    """
    _checks.float_tensor("x", x, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16))
    m = _checks.mask("mask", mask, "x", x)
    n = int(m.sum())
    if n < 2:
        raise ValueError(f"mask: masked_whiten needs at least 2 valid entries, got {n}")
    mean = torch.where(m, x, 0).sum() / n
    centered = torch.where(m, x - mean, 0)
    var = centered.square().sum() / (n - 1)
    out = centered * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = torch.where(m, out + mean, 0)
    return out

"""Generalized Advantage Estimation over response tokens with holes."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, reference
from ._backend import _ext, resolve


def gae(
    rewards: Tensor,
    values: Tensor,
    response_mask: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", eq. 16).

    Per row, on the valid positions t_1 < ... < t_k only (masked positions, e.g. tool output inside a
    multi-turn response, are skipped as if absent): delta_i = r_i + gamma * V_{i+1} - V_i,
    A_i = delta_i + gamma * lam * A_{i+1}, with V and A after the last valid position taken as 0.

    Args:
        rewards, values: [B, T] float32 (same device). response_mask: [B, T] bool or 0/1.
        gamma, lam: in [0, 1].
        backend: "auto" | "torch" | "cpp" | "cuda" | "triton" ("auto": cpp on CPU, triton on CUDA).
    Returns:
        (advantages, returns), [B, T] float32; returns = advantages + values at valid positions; both 0 where
        masked, and a row with no valid position gives zeros. Not differentiable (targets).
    Raises:
        TypeError / ValueError naming the argument (including non-finite rewards/values at valid positions);
        RuntimeError if the backend cannot run here.
    """
    _checks.float_tensor("rewards", rewards, ndim=2, dtypes=(torch.float32,))
    _checks.float_tensor("values", values, ndim=2, dtypes=(torch.float32,))
    _checks.same_shape("values", values, "rewards", rewards)
    _checks.same_device("values", values, "rewards", rewards)
    mask = _checks.mask("response_mask", response_mask, "rewards", rewards)
    gamma = _checks.in_range("gamma", gamma, 0.0, 1.0)
    lam = _checks.in_range("lam", lam, 0.0, 1.0)
    backend = resolve(backend, "gae", rewards.device, ("torch", "cpp", "cuda", "triton"))
    r, v, m = rewards.detach().contiguous(), values.detach().contiguous(), mask.contiguous()
    if backend == "cpp":
        adv, ret = _ext().gae_cpu(r, v, m, gamma, lam)
    elif backend == "cuda":
        adv, ret = _ext().gae_cuda(r, v, m, gamma, lam)
    elif backend == "triton":
        from . import _triton

        adv, ret = _triton.gae(r, v, m, gamma, lam)
    else:
        adv, ret = reference.gae(r, v, m, gamma, lam)
    # A non-finite reward or value at a valid position makes that position's advantage non-finite (and only
    # those do: masked positions are never read), so one check of the output covers both inputs.
    if not bool(torch.isfinite(adv).all()):
        raise ValueError("rewards/values: non-finite entries at valid (response_mask) positions")
    return adv, ret

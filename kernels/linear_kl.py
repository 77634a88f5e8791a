"""Exact per-token KL(pi || pi_ref) over the full vocabulary, with neither logits tensor in global memory.

pi = softmax(f(hidden @ weight.T + bias)), pi_ref = softmax(f(ref_hidden @ ref_weight.T + ref_bias)), f the logit
transform of linear_logprobs.py (scale, optional softcap, temperature: one for both). One pass over the
vocabulary tiles computes both logits tiles and keeps, per token, the online (m, s) of each log-sum-exp and
t = sum e^(z - m) (z - z_ref), rescaled like s. Then
  KL = sum_v p_v (log p_v - log q_v) = t / s - (m - m_ref) - (log s - log s_ref),
written so that large common logit offsets cancel before they meet small terms. The grid, the split
reduction and the backward (dKL/dz = p (log p - log q - KL), recomputed tile by tile) follow
linear_logprobs.py; the reference side gets no gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import by_dot_kind, dot_flags, grouped_pid, logits_tile, lse_step, softcap_tile
from .linear_logprobs import _GEMM_CONFIGS, head_grads, launch_dlogits, lse_parts, vocab_splits


@triton.autotune(configs=_GEMM_CONFIGS, key=["H", "HR", "V", "DOT_F32", "REF_DOT_F32"],
                 prune_configs_by={"early_config_prune": by_dot_kind})
@triton.jit
def _kl_stats_kernel(
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, part_ptr,
    N, V, H, HR, v_per_split, n_splits, inv_temp, cap, stride_h, stride_w, stride_rh, stride_rw,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr, REF_DOT_F32: tl.constexpr, REF_IEEE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """Per (token tile, vocab split): (m, s, t) of the policy and (m, s) of the reference, to part [5, splits, N]."""
    pid_n, pid_s = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(V, v_lo + v_per_split)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    rm = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    rs = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_hi
        z = logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                        BLOCK_N, BLOCK_V, BLOCK_K, DOT_F32, IEEE)
        zr = logits_tile(rh_ptr, rw_ptr, rows, cols, row_mask, col_mask, HR, stride_rh, stride_rw,
                         BLOCK_N, BLOCK_V, BLOCK_K, REF_DOT_F32, REF_IEEE)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_REF_BIAS:
            zr += tl.load(rb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        z = z * inv_temp
        zr = zr * inv_temp
        if HAS_SOFTCAP:
            z, _ = softcap_tile(z, cap)
            zr, _ = softcap_tile(zr, cap)
        diff = z - zr  # +inf where only the reference logit is -inf
        z = tl.where(col_mask[None, :], z, float("-inf"))
        zr = tl.where(col_mask[None, :], zr, float("-inf"))
        m, _, alpha, e = lse_step(m, z)  # e = 0 at masked columns and -inf logits
        s = alpha * s + tl.sum(e, axis=1)
        # 0 log 0 = 0: nothing (not 0 * inf) where e = 0. Once p > 0 met q = 0, t = +inf (KL = +inf) stays so
        # even where alpha underflows to 0.
        t = tl.where(t == float("inf"), t, alpha * t) + tl.sum(e * tl.where(e > 0, diff, 0.0), axis=1)
        rm, _, ralpha, re = lse_step(rm, zr)
        rs = ralpha * rs + tl.sum(re, axis=1)

    base = part_ptr + pid_s * N + rows
    q = n_splits * N
    tl.store(base, m, mask=row_mask)
    tl.store(base + q, s, mask=row_mask)
    tl.store(base + 2 * q, t, mask=row_mask)
    tl.store(base + 3 * q, rm, mask=row_mask)
    tl.store(base + 4 * q, rs, mask=row_mask)


def linear_kl_fwd(hidden, weight, ref_hidden, ref_weight, valid, inv_temp: float, bias=None, ref_bias=None, cap=None):
    """hidden [N, H], weight [V, H], ref_hidden [N, Hr], ref_weight [V, Hr] (any float dtypes), valid [N] bool;
    bias [V] / ref_bias [V] (their head's dtype) or None; (inv_temp, cap) (the transform of linear_logprobs.py).

    Returns (kl, m, log_s, ref_m, ref_log_s), all [N] fp32; kl is 0 where not valid. The rest feed the backward.
    -inf logits: 0 log 0 = 0; KL = +inf where some p > 0 meets q = 0; 0 from a row of all -inf policy logits.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    if n == 0:
        z = hidden.new_zeros(0, dtype=torch.float32)
        return z, z, z, z, z
    n_splits, per_split = vocab_splits(n, v, hidden.device)
    part = torch.empty(5, n_splits, n, dtype=torch.float32, device=hidden.device)
    dot_f32, ieee = dot_flags(hidden.dtype, weight.dtype)
    ref_dot_f32, ref_ieee = dot_flags(ref_hidden.dtype, ref_weight.dtype)  # the reference model may run in another dtype
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * n_splits,)  # noqa: E731
    _kl_stats_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, ref_hidden, ref_weight,
        ref_bias if ref_bias is not None else ref_hidden, part, n, v, h, ref_hidden.shape[1], per_split, n_splits,
        inv_temp, 1.0 if cap is None else cap,
        hidden.stride(0), weight.stride(0), ref_hidden.stride(0), ref_weight.stride(0), DOT_F32=dot_f32, IEEE=ieee,
        REF_DOT_F32=ref_dot_f32, REF_IEEE=ref_ieee, HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None,
        HAS_SOFTCAP=cap is not None,
    )
    m_i, s_i, t_i, rm_i, rs_i = part.unbind(0)
    m, log_s, s, w = lse_parts(m_i, s_i)
    rm, ref_log_s, _, _ = lse_parts(rm_i, rs_i)
    t = torch.where(t_i == float("inf"), t_i, w * t_i).sum(0)  # a split's +inf stands whatever its weight
    kl = t / s - (m - rm) - (log_s - ref_log_s)
    return torch.where(valid & (s > 0), kl, 0.0), m, log_s, rm, ref_log_s


def linear_kl_bwd(hidden, weight, ref_hidden, ref_weight, valid, kl, m, log_s, ref_m, ref_log_s, g_kl,
                  inv_temp: float, need_dh: bool, need_dw: bool, bias=None, ref_bias=None, cap=None, need_db=False):
    """Gradients of sum(g_kl * kl) w.r.t. hidden, weight and bias (inputs' dtypes; None where not needed).

    A row of KL = +inf has no finite gradient: it contributes none.
    """
    if hidden.shape[0] == 0:
        return (torch.zeros_like(hidden) if need_dh else None, torch.zeros_like(weight) if need_dw else None,
                torch.zeros_like(bias) if need_db else None)
    live = valid & torch.isfinite(kl)
    g = torch.where(live, g_kl.float(), 0.0)
    kl = torch.where(live, kl, 0.0)
    ref = (ref_hidden, ref_weight, ref_bias, ref_m, ref_log_s)

    def fill(buf, v0, v1):
        launch_dlogits(buf, v0, v1, hidden, weight, bias, None, m, log_s, kl, g, None, inv_temp, ref=ref, cap=cap)

    dh, dw, db = head_grads(hidden, weight, fill, need_dh, need_dw, need_db)
    if db is not None:
        db = db.to(bias.dtype)
    return dh, dw, db

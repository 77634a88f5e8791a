"""C (fp32) += A @ B for bf16/fp16/fp32 A, B: the accumulating GEMM of the chunked backward passes.

cuBLAS writes its product in the operands' dtype, so summing chunk products of bf16 operands with torch
would round every partial sum to bf16 (or need a full-size temporary). Here each program adds its fp32
product tile to C's: one read and one write of C per call, no temporary. Each C tile belongs to exactly
one program, so the sum is deterministic. A and B may differ in dtype (both are then widened to fp32).

Autotuning is keyed on M, N, K rounded up to powers of two: one of them is a token count, which changes from
call to call, and an exact key would re-tune (benchmark every candidate) for each new one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import by_dot_kind, configs, dot_flags, grouped_pid

# At most 64 fp32 accumulators per thread: with the C tile added in the epilogue, 128 per thread (128x256 on
# 8 warps, 128x128 on 4) spill ~2 KB per thread in ptxas -v for sm_90a (tests/test_triton.py checks this).
_CONFIGS = configs(
    [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        # exact fp32 dots only (see by_dot_kind)
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1),
)


# restore_value: autotuning runs each candidate on the real C, which must be put back between runs.
@triton.autotune(configs=_CONFIGS, key=["M_KEY", "N_KEY", "K_KEY", "DOT_F32"], restore_value=["c_ptr"],
                 prune_configs_by={"early_config_prune": by_dot_kind})
@triton.jit
def _matmul_acc_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K, M_KEY, N_KEY, K_KEY,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + rn.to(tl.int64)[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_rows + ks.to(tl.int64)[None, :] * stride_ak, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_cols + ks.to(tl.int64)[:, None] * stride_bk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    # C is read after the K loop, not before as the initial accumulator: its [BLOCK_M, BLOCK_N] int64 pointers
    # would stay live across the loop and spill registers (232 bytes per thread in ptxas -v for sm_90a).
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
    c_mask = m_mask[:, None] & n_mask[None, :]
    tl.store(c_ptrs, acc + tl.load(c_ptrs, mask=c_mask, other=0.0), mask=c_mask)


def matmul_acc(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c += a @ b in place; c [M, N] fp32, a [M, K] and b [K, N] float, any strides. Returns c."""
    if c.dtype != torch.float32:
        raise TypeError(f"matmul_acc: expected fp32 c, got {c.dtype}")
    m, k = a.shape
    n = b.shape[1]
    if b.shape[0] != k or c.shape != (m, n):
        raise ValueError(f"matmul_acc: shapes {tuple(c.shape)} += {tuple(a.shape)} @ {tuple(b.shape)} do not match")
    if m == 0 or n == 0 or k == 0:
        return c
    dot_f32, ieee = dot_flags(a.dtype, b.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _matmul_acc_kernel[grid](
        a, b, c, m, n, k, *map(triton.next_power_of_2, (m, n, k)),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), DOT_F32=dot_f32, IEEE=ieee,
    )
    return c


def matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out = a @ b with fp32 accumulation and one rounding to out's dtype; a, b, out of any float dtypes. Returns out."""
    if a.dtype == b.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if out.dtype == torch.float32:
        return matmul_acc(out.zero_(), a, b)
    return out.copy_(matmul_acc(torch.zeros(out.shape, dtype=torch.float32, device=out.device), a, b))

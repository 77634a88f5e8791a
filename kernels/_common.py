"""Shared pieces of the Triton kernels: interpreter detection, launch configs, the logits-tile GEMM loop."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (the CPU interpreter: sequential programs, numpy arithmetic)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _mend_interpreter_index() -> None:
    """Make Triton 3.6's interpreter usable with NumPy >= 2.4 (triton-lang/triton#9171, fixed in Triton 3.7).

    Its ``tensor.__index__`` is ``int()`` of a 1-element array, which NumPy 2.4 rejects, so every loop
    bounded by a program id (``range(v_lo, v_hi, ...)``) raises. The interpreter installs that method while a
    kernel runs; this wraps its installer to put a size-1 ``.item()`` version on top (restored with it).
    """
    from triton.runtime import interpreter

    install = getattr(interpreter, "_patch_lang_tensor", None)
    if install is None or getattr(install, "mended", False):
        return

    def mended(tensor, scope):
        install(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    mended.mended = True
    interpreter._patch_lang_tensor = mended


if interpreting() and tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7):
    _mend_interpreter_index()


def configs(gpu: list[triton.Config], interp: triton.Config) -> list[triton.Config]:
    """Autotune candidates on a GPU; one small fixed config under the interpreter (nothing to tune, and slow)."""
    return [interp] if interpreting() else gpu


def by_dot_kind(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune ``early_config_prune``: candidates with BLOCK_K == 32 for exact fp32 dots, the others otherwise.

    An fp32 "ieee" dot runs on the FMA units with both operand tiles in registers: the tensor-core tiles
    (BLOCK_K = 64) spill hundreds of bytes per thread there (ptxas -v, sm_90a), the BLOCK_K = 32 ones none.
    """
    f32 = bool({**named_args, **kwargs}.get("DOT_F32", False))
    return [c for c in configs if (c.kwargs["BLOCK_K"] == 32) == f32] or configs


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a nominal 4 under the interpreter (keeps grids small)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def dot_flags(*dtypes: torch.dtype) -> tuple[bool, bool]:
    """(DOT_F32, IEEE) constexprs for :func:`logits_tile` (and matmul.py) with operands of these dtypes.

    On the GPU, bf16/fp16 tiles of one dtype go to the tensor cores as they are (fp32 accumulator); fp32 tiles
    use the exact "ieee" dot rather than tf32, so fp32 inputs give fp32-accurate results, and so do operands of
    two dtypes (e.g. bf16 hidden states with an fp32 head), both widened to fp32. The interpreter computes bf16
    products wrongly, so there every tile is widened to fp32 first.
    """
    f32 = interpreting() or torch.float32 in dtypes or len(set(dtypes)) > 1
    return f32, f32


def compute_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """dtype of the dz buffers between the head's two operands: theirs, or fp32 when they differ."""
    return a.dtype if a.dtype == b.dtype else torch.float32


@triton.jit
def lse_step(m, z):
    """One tile of an online log-sum-exp: running max m [BN], logits z [BN, BV] -> (new max, centre c, e^(m - c),
    e^(z - c)).

    c is the new max, or 0 while a row has no finite logit yet (masked columns, -inf logits): there e^(-inf - 0) = 0
    where e^(-inf - -inf) would be NaN.
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    c = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, c, tl.exp(m - c), tl.exp(z - c[:, None])


@triton.jit
def grouped_pid(pid, num_rows, num_cols, GROUP: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP row tiles at a time (the usual L2-friendly GEMM order).

    Programs in flight together then share a few row tiles (hidden rows) and a band of column tiles
    (weight rows), so both stay in L2 instead of being streamed from HBM once per program.
    """
    width = GROUP * num_cols
    first = (pid // width) * GROUP
    size = tl.minimum(num_rows - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def logits_tile(
    h_ptr, w_ptr, rows, cols, row_mask, col_mask, K, stride_h, stride_w,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):
    """fp32 [BLOCK_N, BLOCK_V] tile of hidden[rows] @ weight[cols].T, reduced over K in BLOCK_K steps.

    Out-of-range rows/cols load zeros (their logits are 0, masked by the caller). Offsets are int64: V * H
    exceeds 2**31 for large heads.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(h_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def tanh_tile(x):
    """tanh(x) elementwise in fp32, for the logit softcap (Gemma-2/3).

    Not ``tanh`` from libdevice: that is missing from ``tl`` in some Triton versions and the interpreter cannot
    run it. With e = exp(-2|x|) in (0, 1] nothing overflows at any |x|: tanh|x| = (1 - e) / (1 + e). Below
    |x| = 1/8, where 1 - e cancels, it comes from its odd series to x^7 (truncation < 2e-9 relative).
    """
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    return tl.where(tl.abs(x) < 0.125, series, t)


@triton.jit
def softcap_tile(x, cap):
    """(cap * tanh(x), 1 - tanh(x)^2) elementwise in fp32 (see :func:`tanh_tile`).

    1 - tanh^2 = 4e / (1 + e)^2 with e = exp(-2|x|) (the same exp as tanh_tile's, after CSE): accurate relative
    to itself where tanh saturates, which 1 - t^2 from a rounded t is not.
    """
    e = tl.exp(-2.0 * tl.abs(x))
    one_e = 1.0 + e
    return cap * tanh_tile(x), 4.0 * e / (one_e * one_e)

"""GAE over response tokens with holes, as a parallel scan of affine maps (rows and time in parallel).

Going backwards in time, each position t updates the carried state (A, V) = (advantage, value) of the next
valid position:
  valid t:   A <- gamma*lam*A + gamma*V + (r_t - v_t),  V <- v_t
  masked t:  (A, V) unchanged
starting from (0, 0) after the row's end. Both are affine maps (A, V) -> (a A + b V + c, e V + g), and
composing them is associative, so a row is one ``tl.associative_scan`` over time instead of a T-step loop:
the scan at t gives the composite of all maps from the row's end down to t, applied to the carry, whose A
is the advantage at t (valid t; masked positions output 0). The "next valid value" bootstrap needs no
separate pass: it is the V component of the same state.

Rows are tiled over programs; time is processed in BLOCK_T tiles from the end, the carry passing from tile to
tile. Tiles are read with reversed offsets so that the scan runs forward (processing order = decreasing t):
Triton's reverse scan has had argument-order bugs for non-commutative operators (triton-lang/triton#4362).
With few rows and long T, time is also split over programs: a first kernel reduces each time chunk to its
composite map, and the second starts each chunk from the composite of the chunks after it.
All arithmetic is fp32; every output element is written by one program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, num_sms


@triton.jit
def _compose(a1, b1, c1, e1, g1, a2, b2, c2, e2, g2):
    """Map 2 after map 1 (1 = positions processed earlier, i.e. later in time)."""
    return a2 * a1, a2 * b1 + b2 * e1, a2 * c1 + b2 * g1 + c2, e2 * e1, e2 * g1 + g2


@triton.jit
def _tile_maps(r_ptr, v_ptr, m_ptr, rows, row_mask, t_top, t_lo, T, gamma, gl, BLOCK_T: tl.constexpr):
    """Scan of the maps of times t_top, t_top-1, ..., t_top-BLOCK_T+1 (those < t_lo are identities)."""
    ts = t_top - tl.arange(0, BLOCK_T)
    in_range = ts >= t_lo
    mask2 = row_mask[:, None] & in_range[None, :]
    offs = rows.to(tl.int64)[:, None] * T + ts[None, :]
    r = tl.load(r_ptr + offs, mask=mask2, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask2, other=0.0)
    valid = tl.load(m_ptr + offs, mask=mask2, other=0) != 0
    one = tl.full(r.shape, 1.0, tl.float32)
    zero = tl.zeros(r.shape, tl.float32)
    a = tl.where(valid, gl, one)
    b = tl.where(valid, gamma, zero)
    c = tl.where(valid, r - v, zero)
    e = tl.where(valid, zero, one)
    g = tl.where(valid, v, zero)
    a, b, c, e, g = tl.associative_scan((a, b, c, e, g), 1, _compose)
    return a, b, c, e, g, v, valid, offs, mask2


@triton.jit
def _last(x, BLOCK_T: tl.constexpr):
    """x[:, BLOCK_T - 1]: the composite over the whole tile."""
    idx = tl.arange(0, BLOCK_T)
    return tl.sum(tl.where(idx[None, :] == BLOCK_T - 1, x, 0.0), axis=1)


@triton.jit
def _chunk_summary_kernel(
    r_ptr, v_ptr, m_ptr, sum_ptr, B, T, chunk_len, n_chunks, gamma, gl,
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """sum[:, row, chunk] = the composite map (a, b, c, e, g) of the chunk's time steps, for chunks 1.. only:
    a chunk's scan needs the maps of the chunks after it, so nothing ever reads chunk 0's (not computed)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    pid_c = tl.program_id(1) + 1
    t_lo = pid_c * chunk_len
    t_hi = tl.minimum(T, t_lo + chunk_len)
    ca = tl.full((BLOCK_B,), 1.0, tl.float32)
    cb = tl.zeros((BLOCK_B,), tl.float32)
    cc = tl.zeros((BLOCK_B,), tl.float32)
    ce = tl.full((BLOCK_B,), 1.0, tl.float32)
    cg = tl.zeros((BLOCK_B,), tl.float32)
    for i in range(0, tl.cdiv(t_hi - t_lo, BLOCK_T)):
        t_top = t_hi - 1 - i * BLOCK_T
        a, b, c, e, g, _v, _valid, _offs, _mask = _tile_maps(r_ptr, v_ptr, m_ptr, rows, row_mask, t_top, t_lo, T, gamma, gl, BLOCK_T)
        ca, cb, cc, ce, cg = _compose(ca, cb, cc, ce, cg, _last(a, BLOCK_T), _last(b, BLOCK_T), _last(c, BLOCK_T),
                                      _last(e, BLOCK_T), _last(g, BLOCK_T))
    base = sum_ptr + rows * n_chunks + pid_c
    q = B * n_chunks
    tl.store(base, ca, mask=row_mask)
    tl.store(base + q, cb, mask=row_mask)
    tl.store(base + 2 * q, cc, mask=row_mask)
    tl.store(base + 3 * q, ce, mask=row_mask)
    tl.store(base + 4 * q, cg, mask=row_mask)


@triton.jit
def _gae_scan_kernel(
    r_ptr, v_ptr, m_ptr, sum_ptr, adv_ptr, ret_ptr, B, T, chunk_len, n_chunks, gamma, gl,
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Advantages and returns of one (row block, time chunk), starting from the later chunks' carry."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    pid_c = tl.program_id(1)
    t_lo = pid_c * chunk_len
    t_hi = tl.minimum(T, t_lo + chunk_len)
    carry_a = tl.zeros((BLOCK_B,), tl.float32)  # state after the row's end: (A, V) = (0, 0)
    carry_v = tl.zeros((BLOCK_B,), tl.float32)
    q = B * n_chunks
    for i in range(0, n_chunks - 1 - pid_c):  # later chunks, latest first (at most a few dozen)
        base = sum_ptr + rows * n_chunks + (n_chunks - 1 - i)
        a = tl.load(base, mask=row_mask, other=1.0)
        b = tl.load(base + q, mask=row_mask, other=0.0)
        c = tl.load(base + 2 * q, mask=row_mask, other=0.0)
        e = tl.load(base + 3 * q, mask=row_mask, other=1.0)
        g = tl.load(base + 4 * q, mask=row_mask, other=0.0)
        carry_a, carry_v = a * carry_a + b * carry_v + c, e * carry_v + g
    for j in range(0, tl.cdiv(t_hi - t_lo, BLOCK_T)):
        t_top = t_hi - 1 - j * BLOCK_T
        a, b, c, e, g, v, valid, offs, mask2 = _tile_maps(r_ptr, v_ptr, m_ptr, rows, row_mask, t_top, t_lo, T, gamma, gl, BLOCK_T)
        adv = a * carry_a[:, None] + b * carry_v[:, None] + c
        val = e * carry_v[:, None] + g
        tl.store(adv_ptr + offs, tl.where(valid, adv, 0.0), mask=mask2)
        tl.store(ret_ptr + offs, tl.where(valid, adv + v, 0.0), mask=mask2)
        carry_a = _last(adv, BLOCK_T)
        carry_v = _last(val, BLOCK_T)


def _plan(b: int, t: int, device: torch.device, block_b: int | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_T, chunk_len, n_chunks): at least one program per SM (two wanted) where the shape allows.

    Programs are found first by putting fewer rows in each, which costs nothing, and only then by splitting
    time, which costs a second launch and a summary pass that reads the later chunks' inputs once more.
    At B=256, T=4096 on 132 SMs: 256 one-row programs, one launch, every input read once.
    ``block_b`` forces the rows per program (the benchmark compares plans with it).
    """
    if interpreting():  # small tiles, and a nominal 4 SMs, so that the tests reach every path
        block_t = min(32, triton.next_power_of_2(t))
        max_b = 4
    else:
        block_t = min(1024, max(16, triton.next_power_of_2(t)))
        max_b = 2048 // block_t
    sms = num_sms(device)
    if block_b is not None and (block_b < 1 or block_b & (block_b - 1)):
        raise ValueError(f"block_b: rows per program must be a power of 2, got {block_b}")
    if block_b is None:
        block_b = max(1, min(triton.next_power_of_2(b), max_b))
        while block_b > 1 and triton.cdiv(b, block_b) < sms:
            block_b //= 2
    row_blocks = triton.cdiv(b, block_b)
    n_chunks = 1
    if row_blocks < sms:  # too few rows to fill the machine: split time as well
        n_chunks = max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(t, block_t)))
    chunk_len = triton.cdiv(triton.cdiv(t, n_chunks), block_t) * block_t
    return block_b, block_t, chunk_len, triton.cdiv(t, chunk_len)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
        block_b: int | None = None):
    """rewards, values [B, T] fp32 contiguous; mask [B, T] bool -> (advantages, returns) [B, T] fp32 (0 where masked).

    ``block_b``: rows per program, a power of 2 (default: :func:`_plan`'s choice)."""
    b, t = rewards.shape
    adv = torch.empty_like(rewards)
    ret = torch.empty_like(rewards)
    if b == 0 or t == 0:
        return adv, ret
    m8 = mask.contiguous().view(torch.uint8)
    block_b, block_t, chunk_len, n_chunks = _plan(b, t, rewards.device, block_b)
    grid = (triton.cdiv(b, block_b), n_chunks)
    summary = torch.empty(5, b, n_chunks, dtype=torch.float32, device=rewards.device)
    if interpreting():  # the tests: reading a summary that no program wrote (chunk 0's) would show as NaN
        summary.fill_(float("nan"))
    gamma, gl = float(gamma), float(gamma) * float(lam)
    if n_chunks > 1:
        _chunk_summary_kernel[(grid[0], n_chunks - 1)](rewards, values, m8, summary, b, t, chunk_len, n_chunks, gamma,
                                                       gl, BLOCK_B=block_b, BLOCK_T=block_t)
    _gae_scan_kernel[grid](rewards, values, m8, summary, adv, ret, b, t, chunk_len, n_chunks, gamma, gl,
                           BLOCK_B=block_b, BLOCK_T=block_t)
    return adv, ret

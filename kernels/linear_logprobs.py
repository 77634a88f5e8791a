"""Fused linear log-probs + entropy: logits z = f(hidden @ weight.T + bias), never written to global memory.

f is the logit transform: x -> x * inv_temp (inv_temp = logit_scale / T), or with a softcap (constexpr
HAS_SOFTCAP, set by passing ``cap``) x -> cap * tanh(x * inv_temp) with inv_temp = logit_scale / softcap and
cap = softcap / T. Without a softcap the kernels compile exactly as before.

Forward (``linear_logprobs_fwd``): a grid over (token tile, vocabulary split). Each program streams its
split's vocabulary tiles through a GEMM main loop and keeps an online log-sum-exp on-chip: per token the
running max m, s = sum exp(z - m), and, only when entropy is asked for, t = sum exp(z - m) (z - m); it
also picks out the label's logit. The few floats per (split, token) go to a small [4, splits, N] buffer
that a deterministic reduction over splits turns into lse, log-prob and entropy (splitting the vocabulary
is what gives small batches enough programs; no atomics, so the result does not depend on scheduling).

Backward (``linear_logprobs_bwd``, shared with linear_kl through ``head_grads``): the vocabulary is cut
into chunks of Vc columns. For each chunk a kernel recomputes the logits tiles and writes only
dz = d(loss)/d(logits) into a bounded [N, Vc] buffer in the input dtype; dweight[chunk] = dz.T @ hidden
is then one GEMM (written once: no cross-chunk accumulation) and dhidden += dz @ weight[chunk] goes into
an fp32 accumulator. Every output element has exactly one writer, so dhidden/dweight/dbias are
deterministic; the interpreter runs programs one after another and could not reveal a race, which is why
the design has none by construction. Cost: 1 recompute + 2 GEMM passes of N*H*V (4 with the forward).

Gradient w.r.t. the final logits z (then times dz/dx = inv_temp, or inv_temp * cap * (1 - tanh^2) with
a softcap, for the raw logits x):
  log-prob  log p_y           ->  onehot(y) - p
  entropy   H = -sum p log p   ->  -p (log p + H)

dtypes: hidden and weight may differ (e.g. bf16 hidden states, fp32 head): the tiles are then widened to fp32
(``dot_flags``) and dz is fp32 (``compute_dtype``). -inf logits (a bias of -inf): p = 0 there and 0 log 0 = 0,
whole tiles or splits of -inf included (``lse_step``, ``lse_parts``); a label whose logit is -inf has log-prob
-inf, a row of all -inf logits log-probs -inf and entropy 0; the gradient stays onehot(y) - p.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (by_dot_kind, compute_dtype, configs, dot_flags, grouped_pid, interpreting, logits_tile, lse_step,
                      num_sms, softcap_tile, tanh_tile)
from .matmul import matmul_acc, matmul_into

# Vocabulary splits are multiples of this, so that every BLOCK_V among the configs tiles a split evenly.
_SPLIT_GRANULE = 32 if interpreting() else 256
# Bytes of the backward's dz buffer ([N, Vc] in the input dtype): about the size of hidden itself (Vc ~ H
# columns keeps both backward GEMMs large: K or M = Vc >= 4096 for 7B-class heads), within these bounds.
# Tiny under the interpreter so that the tests go through several vocabulary chunks.
_BWD_BUFFER_MIN, _BWD_BUFFER_MAX = ((8 << 10), (8 << 10)) if interpreting() else ((64 << 20), (512 << 20))

_GEMM_CONFIGS = configs(
    [
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64, "GROUP_N": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_K": 64, "GROUP_N": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_K": 64, "GROUP_N": 8}, num_warps=4, num_stages=4),
        # the only one in which linear_kl's two-GEMM stats kernel does not spill (ptxas -v, sm_90a)
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_K": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
        # exact fp32 dots only (see by_dot_kind)
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_K": 32, "GROUP_N": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 32, "GROUP_N": 8}, num_warps=4, num_stages=3),
    ],
    triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 32, "GROUP_N": 2}, num_warps=4, num_stages=1),
)


@triton.autotune(configs=_GEMM_CONFIGS, key=["H", "V", "HAS_BIAS", "ENTROPY", "STORE_LOGITS", "DOT_F32"],
                 prune_configs_by={"early_config_prune": by_dot_kind})
@triton.jit
def _stats_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, logits_ptr, part_ptr,
    N, V, H, v_per_split, n_splits, inv_temp, cap, stride_h, stride_w, stride_logits,
    HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, STORE_LOGITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """Per (token tile, vocab split): online (m, s, t) and the label logit; optionally stores the fp32 logits.

    STORE_LOGITS is used only by the single-pass loss (kernels/fused_linear_loss.py), which keeps one token
    chunk's logits to avoid recomputing them; linear_logprobs never stores any. With HAS_SOFTCAP what is stored
    is the tanh's argument x * inv_temp: the backward takes both tanh and its derivative from it.
    """
    pid_n, pid_s = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(V, v_lo + v_per_split)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    z_label = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_hi
        z = logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                        BLOCK_N, BLOCK_V, BLOCK_K, DOT_F32, IEEE)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        z = z * inv_temp
        if STORE_LOGITS:
            out = logits_ptr + rows.to(tl.int64)[:, None] * stride_logits + cols[None, :]
            tl.store(out, z, mask=row_mask[:, None] & col_mask[None, :])
        if HAS_SOFTCAP:
            z, _ = softcap_tile(z, cap)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new, c, alpha, e = lse_step(m, z)  # e = 0 at masked columns and -inf logits
        if ENTROPY:
            # t = sum e^(z-m) (z-m) re-centred on c: alpha * (t + (m - c) s). While s == 0 (no finite logit yet)
            # m may be -inf: the shift is dropped there, not multiplied by 0 (NaN).
            zc = z - c[:, None]
            shift = tl.where(s > 0, m - c, 0.0)
            t = alpha * (t + shift * s)
            t += tl.sum(e * tl.where(e > 0, zc, 0.0), axis=1)  # 0 log 0 = 0: 0, not 0 * -inf, where e = 0
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        hit = (cols[None, :] == labels[:, None]) & col_mask[None, :]
        z_label += tl.sum(tl.where(hit, z, 0.0), axis=1)

    base = part_ptr + pid_s * N + rows
    stride_q = n_splits * N
    tl.store(base, m, mask=row_mask)
    tl.store(base + stride_q, s, mask=row_mask)
    tl.store(base + 2 * stride_q, t, mask=row_mask)
    tl.store(base + 3 * stride_q, z_label, mask=row_mask)


def vocab_splits(n_tokens: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, columns per split) for the forward grid.

    On a GPU: enough (token tile x split) programs for ~4 waves, and >= 16 splits so that the grouped order
    puts a band of weight tiles and a few hidden tiles in flight together. Under the interpreter: up to 3
    splits, so the tests exercise the cross-split reduction.
    """
    max_splits = triton.cdiv(vocab, _SPLIT_GRANULE)
    if interpreting():
        want = 3
    else:
        want = max(16, triton.cdiv(4 * num_sms(device), triton.cdiv(n_tokens, 128)))
    per_split = triton.cdiv(triton.cdiv(vocab, min(want, max_splits)), _SPLIT_GRANULE) * _SPLIT_GRANULE
    return triton.cdiv(vocab, per_split), per_split


def launch_stats(hidden, weight, bias, labels, inv_temp, entropy, logits=None, cap=None):
    """Run the forward kernel; returns the [4, splits, N] partials (m, s, t, label logit). cap: see the module docstring."""
    n, h = hidden.shape
    v = weight.shape[0]
    n_splits, per_split = vocab_splits(n, v, hidden.device)
    part = torch.empty(4, n_splits, n, dtype=torch.float32, device=hidden.device)
    dot_f32, ieee = dot_flags(hidden.dtype, weight.dtype)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * n_splits,)  # noqa: E731
    _stats_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, labels, logits if logits is not None else part, part,
        n, v, h, per_split, n_splits, inv_temp, 1.0 if cap is None else cap, hidden.stride(0), weight.stride(0),
        logits.stride(0) if logits is not None else 0,
        HAS_BIAS=bias is not None, ENTROPY=entropy, STORE_LOGITS=logits is not None, HAS_SOFTCAP=cap is not None,
        DOT_F32=dot_f32, IEEE=ieee,
    )
    return part


def lse_parts(m_i: torch.Tensor, s_i: torch.Tensor):
    """Per-split (max, sum e^(z - max)) [splits, N] -> (m, log_s, s, w) with lse = m + log_s, s = e^log_s and w =
    e^(m_i - m) the splits' weights.

    A row without a finite logit (every m_i = -inf) gets m = 0 and log_s = +inf: its log-probs (z - m) - log_s
    are -inf, not NaN; a split without one gets w = 0.
    """
    m = m_i.amax(0)
    m = m.masked_fill(m == float("-inf"), 0.0)
    w = torch.exp(m_i - m)
    s = (w * s_i).sum(0)
    return m, torch.where(s > 0, torch.log(s), float("inf")), s, w


def combine_stats(part: torch.Tensor, valid: torch.Tensor, entropy: bool):
    """Deterministic reduction of the per-split partials.

    Returns (logprobs, entropy or None, m, log_s) per token, with lse = m + log_s kept as two numbers: at
    |z| ~ 1e4 their fp32 sum would lose ~1e-3 nats that (z - m) - log_s keeps. A row of all -inf logits has
    log-prob -inf and entropy 0; so does a label whose logit is -inf (log-prob).
    """
    m_i, s_i, t_i, z_label = part.unbind(0)
    m, log_s, s, w = lse_parts(m_i, s_i)
    logprobs = torch.where(valid, (z_label.sum(0) - m) - log_s, 0.0)
    ent = None
    if entropy:
        # sum_v e^(z-m) (z-m) over the whole vocabulary; a split without a finite logit (m_i = -inf) adds nothing
        t = torch.where(s_i > 0, w * (t_i + (m_i - m) * s_i), 0.0).sum(0)
        ent = torch.where(valid & (s > 0), log_s - t / s, 0.0)
    return logprobs, ent, m, log_s


def linear_logprobs_fwd(hidden, weight, bias, labels, inv_temp: float, ignore_index: int, entropy: bool, cap=None):
    """hidden [N, H], weight [V, H], bias [V] or None, labels [N] int64 -> (logprobs, entropy|None, m, log_s).

    (inv_temp, cap): the logit transform (see the module docstring).
    All [N] fp32; logprobs and entropy are 0 where labels == ignore_index; (m, log_s) feed the backward.
    """
    n = hidden.shape[0]
    if n == 0:
        z = hidden.new_zeros(0, dtype=torch.float32)
        return z, (z if entropy else None), z, z
    part = launch_stats(hidden, weight, bias, labels, inv_temp, entropy, cap=cap)
    return combine_stats(part, labels != ignore_index, entropy)


@triton.jit
def logprob_entropy_grad(z, cols, labels, m, log_s, ent, g_lp, g_ent, ENTROPY: tl.constexpr):
    """d(g_lp log p_y + g_ent H)/dz for a tile of final logits z [BN, BV] (per-token vectors [BN])."""
    logp = (z - m[:, None]) - log_s[:, None]
    p = tl.exp(logp)
    onehot = cols[None, :] == labels[:, None]
    dz = tl.where(onehot, g_lp[:, None], 0.0) - g_lp[:, None] * p
    if ENTROPY:
        dz -= g_ent[:, None] * p * tl.where(p > 0, logp + ent[:, None], 0.0)  # 0, not 0 * -inf, where p = 0
    return dz


@triton.autotune(configs=_GEMM_CONFIGS, key=["H", "HR", "HAS_BIAS", "ENTROPY", "KL", "DOT_F32", "REF_DOT_F32"],
                 prune_configs_by={"early_config_prune": by_dot_kind})
@triton.jit
def _dlogits_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, m_ptr, logs_ptr, ent_ptr, g_ptr, gent_ptr,
    rh_ptr, rw_ptr, rb_ptr, rm_ptr, rlogs_ptr, out_ptr,
    N, H, HR, v_start, v_end, inv_temp, cap, stride_h, stride_w, stride_rh, stride_rw, stride_out,
    HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, KL: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    REF_DOT_F32: tl.constexpr, REF_IEEE: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """out[:, v - v_start] = dloss/dx (x the raw logits) for v in [v_start, v_end): one (token tile, vocab tile) per program.

    Recomputes the tile's logits (and, for KL, the reference logits, same transform) instead of reading stored ones.
    Without KL: gradient of g . logprob (+ g_ent . entropy). With KL (ent_ptr holds the per-token KL,
    g_ptr its upstream gradient, rm/rlogs the reference's m/log_s): dKL/dz = p (log p - log q - KL).
    Each output element is written by exactly one program.
    """
    n_cols = v_end - v_start
    pid_n, pid_v = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(n_cols, BLOCK_V), GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = v_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < v_end
    z = logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                    BLOCK_N, BLOCK_V, BLOCK_K, DOT_F32, IEEE)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    z = z * inv_temp
    m = tl.load(m_ptr + rows, mask=row_mask, other=0.0)
    log_s = tl.load(logs_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)  # 0 for padding rows -> dz = 0 there
    if KL:
        zr = logits_tile(rh_ptr, rw_ptr, rows, cols, row_mask, col_mask, HR, stride_rh, stride_rw,
                         BLOCK_N, BLOCK_V, BLOCK_K, REF_DOT_F32, REF_IEEE)
        if HAS_REF_BIAS:
            zr += tl.load(rb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        zr = zr * inv_temp
        if HAS_SOFTCAP:
            zr, _ = softcap_tile(zr, cap)
            # After the reference GEMM, and 1 - tanh^2 from tanh itself (quantized where tanh saturates, ~6e-8 /
            # (1 - |tanh|) relative): with softcap_tile's exact form here the bf16 configs spill 300-750 bytes per
            # thread (ptxas -v, sm_90a), as they do with it before the reference GEMM.
            t = tanh_tile(z)
            z = t * cap
            dcap = (1.0 - t) * (1.0 + t)
        rm = tl.load(rm_ptr + rows, mask=row_mask, other=0.0)
        rlog_s = tl.load(rlogs_ptr + rows, mask=row_mask, other=0.0)
        kl = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        logp = (z - m[:, None]) - log_s[:, None]
        logq = (zr - rm[:, None]) - rlog_s[:, None]
        p = tl.exp(logp)
        # 0 where p = 0 (0 log 0 = 0); log q = -inf (q = 0) where p > 0 only in rows of KL = +inf, which the caller
        # gives g = 0 and kl = 0: the clamp keeps their 0 * inf from NaN
        dz = g[:, None] * p * tl.where(p > 0, logp - tl.maximum(logq, -3.4028234663852886e38) - kl[:, None], 0.0)
    else:
        if HAS_SOFTCAP:
            z, dcap = softcap_tile(z, cap)
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
        if ENTROPY:
            ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
            g_ent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
        else:
            ent = m
            g_ent = g
        dz = logprob_entropy_grad(z, cols, labels, m, log_s, ent, g, g_ent, ENTROPY)
    if HAS_SOFTCAP:
        dz = dz * (dcap * cap)  # dz/dx = inv_temp * cap * (1 - tanh^2)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + (cols - v_start)[None, :]
    tl.store(out, (dz * inv_temp).to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def launch_dlogits(out, v_start, v_end, hidden, weight, bias, labels, m, log_s, ent, g, g_ent, inv_temp, ref=None,
                   cap=None):
    """Fill out[:, :v_end - v_start] with dloss/dx for the raw logits x. ``ref`` = (ref_hidden, ref_weight, ref_bias
    or None, ref_m, ref_log_s) for KL; (inv_temp, cap): the logit transform (see the module docstring)."""
    n, h = hidden.shape
    dot_f32, ieee = dot_flags(hidden.dtype, weight.dtype)
    rh, rw, rb, rm, rlog_s = ref if ref is not None else (hidden, weight, None, m, log_s)
    ref_dot_f32, ref_ieee = dot_flags(rh.dtype, rw.dtype)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v_end - v_start, meta["BLOCK_V"]),)  # noqa: E731
    _dlogits_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, labels if labels is not None else m, m, log_s,
        ent if ent is not None else m, g, g_ent if g_ent is not None else g, rh, rw, rb if rb is not None else rh,
        rm, rlog_s, out, n, h, rh.shape[1], v_start, v_end, inv_temp, 1.0 if cap is None else cap,
        hidden.stride(0), weight.stride(0), rh.stride(0), rw.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, ENTROPY=g_ent is not None, KL=ref is not None, DOT_F32=dot_f32, IEEE=ieee,
        REF_DOT_F32=ref_dot_f32, REF_IEEE=ref_ieee, HAS_REF_BIAS=rb is not None, HAS_SOFTCAP=cap is not None,
    )


def vocab_chunk(n_tokens: int, hidden_size: int, vocab: int, elem_bytes: int) -> int:
    """Columns per backward chunk: a [N, Vc] dz buffer of ~N*H elements (bounded), Vc a multiple of the granule.

    The backward's memory beyond its outputs is this buffer plus, with > 1 chunk, the fp32 dhidden
    accumulator (N*H*4 bytes): ~3x hidden's own size in bf16.
    """
    budget = min(max(n_tokens * hidden_size * elem_bytes, _BWD_BUFFER_MIN), _BWD_BUFFER_MAX)
    vc = budget // max(1, n_tokens * elem_bytes)
    vc = max(_SPLIT_GRANULE, vc // _SPLIT_GRANULE * _SPLIT_GRANULE)
    return min(vc, vocab)


def head_grads(hidden, weight, fill, need_dh: bool, need_dw: bool, need_db: bool):
    """(dhidden, dweight, dbias) of sum(dz * logits) for logits = hidden @ weight.T (+ bias).

    ``fill(buf, v0, v1)`` writes dz[:, v0:v1] (w.r.t. the raw logits: through the transform) into buf[:, :v1 - v0]. dweight rows of
    a chunk are one GEMM over all tokens (fp32 inside, one rounding); dhidden sums over chunks in fp32. buf is in the
    inputs' dtype, fp32 when hidden and weight differ (see ``compute_dtype``).
    """
    n, _ = hidden.shape
    v = weight.shape[0]
    dh = dw = db = None
    if not (need_dh or need_dw or need_db):
        return dh, dw, db
    dtype = compute_dtype(hidden, weight)
    vc = vocab_chunk(n, hidden.shape[1], v, dtype.itemsize)
    single = vc >= v and hidden.dtype == weight.dtype
    buf = torch.empty(n, vc, dtype=dtype, device=hidden.device)
    if need_dw:
        dw = torch.empty_like(weight)
    if need_db:
        db = torch.empty(v, dtype=torch.float32, device=hidden.device)
    dh32 = None
    if need_dh and not single:
        dh32 = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for v0 in range(0, v, vc):
        v1 = min(v, v0 + vc)
        d = buf[:, : v1 - v0]
        fill(buf, v0, v1)
        if need_dw:
            matmul_into(dw[v0:v1], d.T, hidden)
        if need_dh:
            if single:
                dh = torch.mm(d, weight)
            else:
                matmul_acc(dh32, d, weight[v0:v1])
        if need_db:
            db[v0:v1] = d.sum(0, dtype=torch.float32)
    buf = d = None  # freed before the cast below allocates dhidden: the two never add up in the peak
    if dh32 is not None:
        dh = dh32.to(hidden.dtype)
    return dh, dw, db


def linear_logprobs_bwd(hidden, weight, bias, labels, m, log_s, entropy, g_lp, g_ent, inv_temp: float,
                        ignore_index: int, need_dh: bool, need_dw: bool, need_db: bool, cap=None):
    """Gradients of sum(g_lp * logprobs + g_ent * entropy) w.r.t. hidden, weight, bias (inputs' dtypes).

    g_lp / g_ent: [N] upstream gradients or None (entropy's only when the forward computed it).
    """
    valid = labels != ignore_index
    g = torch.zeros_like(m) if g_lp is None else (g_lp.float() * valid).contiguous()
    ge = None if g_ent is None else (g_ent.float() * valid).contiguous()
    if hidden.shape[0] == 0:
        return (torch.zeros_like(hidden) if need_dh else None, torch.zeros_like(weight) if need_dw else None,
                torch.zeros(weight.shape[0], device=weight.device) if need_db else None)

    def fill(buf, v0, v1):
        launch_dlogits(buf, v0, v1, hidden, weight, bias, labels, m, log_s, entropy, g, ge, inv_temp, cap=cap)

    dh, dw, db = head_grads(hidden, weight, fill, need_dh, need_dw, need_db)
    if db is not None:
        db = db.to(bias.dtype)
    return dh, dw, db

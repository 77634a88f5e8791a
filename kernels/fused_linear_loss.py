"""Single-pass engine for a per-token loss on linear log-probs (the PPO loss): value and gradients together.

Tokens go in groups of G, each group in chunks of C (Liger-style bounded buffers: C x V fp32 logits and
G x V dz in the input dtype, fp32 when hidden and weight differ). Per chunk:
  1. the forward kernel of linear_logprobs.py runs with STORE_LOGITS: a GEMM pass that also leaves the
     online (m, s, t) partials, so log-probs and entropies follow from a tiny reduction;
  2. the caller's ``token_grads`` turns them into the chunk's loss and per-token dloss/dlogprob, dloss/dentropy;
  3. an elementwise kernel reads the stored logits and writes dz = dloss/dlogits (no GEMM recompute; with a
     softcap the stored values are the tanh's arguments and the tanh is re-evaluated) into the group's rows
     of the dz buffer.
Per group: dhidden[group] = dz @ weight and dweight += dz.T @ hidden[group] (fp32 accumulator across groups).
So forward + backward is 3 matmul passes of N*H*V (logits, dhidden, dweight) rather than 4, and the
autograd backward only scales the stored gradients. Why groups larger than chunks: each dweight step reads
and writes the fp32 V x H accumulator (8*V*H bytes) for 2*G*H*V flops, G/4 flops per byte, which is near
an H100's ratio of matmul rate to bandwidth (~270-300) at G ~ 1000; the logits pass only needs C flops per
byte of weight streamed. Every output element has one writer per group and groups run in order:
deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import compute_dtype, configs, interpreting, softcap_tile
from .linear_logprobs import combine_stats, launch_stats, logprob_entropy_grad
from .matmul import matmul_acc, matmul_into

# Bytes of the two buffers together; small under the interpreter so that the tests span several chunks and
# groups. By default G = 3 C: C x V x 4 + 3 C x V x 2 bytes (bf16).
_CHUNK_BUFFER_BYTES = (32 << 10) if interpreting() else (1 << 30)
_GROUP_CHUNKS = 3

_ELEMENTWISE_CONFIGS = configs(
    [
        triton.Config({"BLOCK_N": 16, "BLOCK_V": 512}, num_warps=8),
        triton.Config({"BLOCK_N": 8, "BLOCK_V": 1024}, num_warps=8),
        triton.Config({"BLOCK_N": 32, "BLOCK_V": 256}, num_warps=4),
    ],
    triton.Config({"BLOCK_N": 16, "BLOCK_V": 32}, num_warps=4),
)


@triton.autotune(configs=_ELEMENTWISE_CONFIGS, key=["V", "ENTROPY"])
@triton.jit
def _dlogits_from_logits_kernel(
    z_ptr, labels_ptr, m_ptr, logs_ptr, ent_ptr, g_ptr, gent_ptr, out_ptr,
    N, V, stride_z, stride_out, inv_temp, cap,
    ENTROPY: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """out = d(g . logprob + g_ent . entropy)/dx (x the raw logits) from the stored logits (one writer per element).

    Stored are the final logits, or with HAS_SOFTCAP the tanh's argument: tanh and its derivative are then
    recomputed from it, to full relative accuracy even where tanh saturates (1 - tanh^2 taken from a stored
    final logit would be quantized by the rounding of tanh near +-1).
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask, col_mask = rows < N, cols < V
    mask = row_mask[:, None] & col_mask[None, :]
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :], mask=mask, other=0.0)
    if HAS_SOFTCAP:
        z, dcap = softcap_tile(z, cap)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    m = tl.load(m_ptr + rows, mask=row_mask, other=0.0)
    log_s = tl.load(logs_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    if ENTROPY:
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        g_ent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
    else:
        ent = m
        g_ent = g
    dz = logprob_entropy_grad(z, cols, labels, m, log_s, ent, g, g_ent, ENTROPY)
    if HAS_SOFTCAP:
        dz = dz * (dcap * cap)  # dz/dx = inv_temp * cap * (1 - tanh^2)
    dz = dz * inv_temp
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], dz.to(out_ptr.dtype.element_ty), mask=mask)


def plan(n_tokens: int, vocab: int, elem_bytes: int, chunk_size: int | None = None) -> tuple[int, int]:
    """(C, G): tokens per logits chunk and per dz group, G a multiple of C, both within the buffer budget.

    C defaults to the budget shared as C x V fp32 + _GROUP_CHUNKS C x V dz (a multiple of 128 when >= 128);
    a given C keeps it and G takes what the budget leaves (at least C). Both are capped at n_tokens.
    """
    row_z, row_d = vocab * 4, vocab * elem_bytes
    chunk = chunk_size or max(1, _CHUNK_BUFFER_BYTES // (row_z + _GROUP_CHUNKS * row_d))
    if chunk_size is None and chunk >= 128:
        chunk = chunk // 128 * 128
    group = max(chunk, (_CHUNK_BUFFER_BYTES - chunk * row_z) // row_d // chunk * chunk)
    group = max(1, min(group, n_tokens))
    return max(1, min(chunk, group)), group


def fused_linear_loss(hidden, weight, labels, bias, inv_temp: float, ignore_index: int, token_grads,
                      need_entropy: bool, chunk_size: int | None, need_dh: bool, need_dw: bool, need_db: bool, cap=None):
    """Loss of per-token terms on log_softmax(f(hidden @ weight.T + bias))[labels], with its gradients.

    f: x -> x * inv_temp, or cap * tanh(x * inv_temp) when ``cap`` is given (the transform of linear_logprobs.py).

    Args:
        hidden [N, H], weight [V, H] (dtypes may differ: dz is then fp32), labels [N] int64 (valid or ignore_index),
            bias [V] or None.
        token_grads(logprobs [n], entropy [n] | None, start, end) -> (loss 0-d fp32, g_lp [n], g_ent [n] | None):
            the chunk's summed loss and its gradients w.r.t. the chunk's log-probs / entropies (ignored tokens
            arrive as 0 and their gradients are dropped); the gradients may be None when none is needed.
        chunk_size: tokens per logits chunk (None: from the buffer budget; see ``plan``).
    Returns:
        (loss 0-d fp32, logprobs [N] fp32, entropy [N] fp32 or None, dhidden, dweight, dbias) with the gradients
        of loss in the inputs' dtypes (None where not needed).
    """
    n, _ = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    dtype = compute_dtype(hidden, weight)
    chunk, group = plan(n, v, dtype.itemsize, chunk_size)
    valid = labels != ignore_index
    logprobs = torch.zeros(n, dtype=torch.float32, device=dev)
    entropy = torch.zeros(n, dtype=torch.float32, device=dev) if need_entropy else None
    loss = torch.zeros((), dtype=torch.float32, device=dev)
    need_grads = need_dh or need_dw or need_db
    dh = torch.empty_like(hidden) if need_dh else None
    single = group >= n
    dw = dw32 = None
    if need_dw:
        dw = torch.empty_like(weight) if single else None
        dw32 = None if single else torch.zeros(weight.shape, dtype=torch.float32, device=dev)
    db32 = torch.zeros(v, dtype=torch.float32, device=dev) if need_db else None
    if n == 0:
        return (loss, logprobs, entropy, dh, torch.zeros_like(weight) if need_dw else None,
                None if db32 is None else db32.to(bias.dtype))
    zbuf = torch.empty(chunk, v, dtype=torch.float32, device=dev)
    dbuf = torch.empty(group, v, dtype=dtype, device=dev) if need_grads else None
    for g0 in range(0, n, group):
        g1 = min(n, g0 + group)
        for c0 in range(g0, g1, chunk):
            c1 = min(g1, c0 + chunk)
            lab_c, ok = labels[c0:c1], valid[c0:c1]
            z = zbuf[: c1 - c0]
            part = launch_stats(hidden[c0:c1], weight, bias, lab_c, inv_temp, need_entropy, logits=z, cap=cap)
            lp, ent, m, log_s = combine_stats(part, ok, need_entropy)
            loss_c, g_lp, g_ent = token_grads(lp, ent, c0, c1)
            loss += loss_c
            logprobs[c0:c1] = lp
            if need_entropy:
                entropy[c0:c1] = ent
            if not need_grads:
                continue
            g = (g_lp.float() * ok).contiguous()
            ge = None if (g_ent is None or not need_entropy) else (g_ent.float() * ok).contiguous()
            d = dbuf[c0 - g0: c1 - g0]
            grid = lambda meta: (triton.cdiv(c1 - c0, meta["BLOCK_N"]), triton.cdiv(v, meta["BLOCK_V"]))  # noqa: E731
            _dlogits_from_logits_kernel[grid](
                z, lab_c, m, log_s, ent if ge is not None else m, g, ge if ge is not None else g, d,
                c1 - c0, v, z.stride(0), d.stride(0), inv_temp, 1.0 if cap is None else cap, ENTROPY=ge is not None,
                HAS_SOFTCAP=cap is not None,
            )
        if not need_grads:
            continue
        d, h_g = dbuf[: g1 - g0], hidden[g0:g1]
        if need_dh:
            matmul_into(dh[g0:g1], d, weight)
        if need_dw:
            if single:
                matmul_into(dw, d.T, h_g)
            else:
                matmul_acc(dw32, d.T, h_g)
        if need_db:
            db32 += d.sum(0, dtype=torch.float32)
    zbuf = dbuf = z = d = None  # freed before the casts below allocate the outputs
    if dw32 is not None:
        dw = dw32.to(weight.dtype)
    db = None if db32 is None else db32.to(bias.dtype)
    return loss, logprobs, entropy, dh, dw, db

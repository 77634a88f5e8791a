"""Fisher-vector products of a softmax LM head, exact over the vocabulary (for TRPO, Schulman et al. 2015, app. C)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from ._rows import ValidRows
from .logprobs import _chunk_size

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def linear_fisher_product(
    hidden: Tensor,
    weight: Tensor,
    d_hidden: Tensor,
    d_weight: Tensor | None,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    check_inputs: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """J^T M J v for the logits z = hidden @ weight.T / T: the Fisher (= KL Hessian) of the head times a tangent.

    With p = softmax(z) per token, M = diag(p) - p p^T and the tangent dz = (d_hidden @ W^T + h @ d_weight^T) / T:
        g_hidden = (M dz) W / T        [..., H]
        g_weight = sum_tokens (M dz)^T h / T   [V, H]
    Why this is the Hessian of sum_tokens KL(pi_old || pi) w.r.t. (hidden, weight) at pi = pi_old: per token
    KL = sum_v p_old(v) (log p_old(v) - log p(v)), so dKL/dz = p - p_old and d2KL/dz2 = diag(p) - p p^T = M.
    By the chain rule, Hess_theta KL = J^T M J + sum_v (dKL/dz_v) Hess_theta z_v; z is bilinear in (h, W), so
    Hess z_v != 0, but its coefficient p - p_old vanishes at theta = theta_old: the Gauss-Newton form J^T M J is
    exact there, and M is the Fisher information of the categorical in its logits (Schulman 2015, app. C).

    Chunked over tokens: at most ``chunk_size`` x V logits alive, accumulated in fp32 (float64 if hidden or weight
    is float64) whatever the ambient autocast. hidden and weight may differ in dtype (a bf16 trunk, an fp32 head).

    Args:
        hidden: [..., H] float32/bfloat16/float16/float64 hidden states at theta_old; weight: [V, H], any of those
            dtypes, hidden's device.
        d_hidden: tangent of hidden, hidden's shape/dtype/device. d_weight: [V, H] tangent of weight (weight's
            dtype), or None (head frozen).
        labels: optional [...] int64 (hidden's leading shape); only ``ignore_index`` positions are used: they
            contribute nothing and get g_hidden = 0.
        temperature: > 0, as in :func:`linear_logprobs`. chunk_size: tokens per chunk (default: from a memory budget).
        check_inputs: None | True | False: how the label values are checked (see :func:`linear_logprobs`).
    Returns:
        (g_hidden [..., H] of hidden's dtype, g_weight [V, H] of weight's dtype or None when d_weight is None);
        units: nats per unit of the tangent squared. Not differentiable (computed without a graph).
    Raises:
        TypeError / ValueError naming the argument (dtype, shape, device, labels out of range, temperature <= 0).
    """
    _checks.float_tensor("hidden", hidden, min_ndim=1, dtypes=_DTYPES)
    _checks.float_tensor("weight", weight, ndim=2, dtypes=_DTYPES)
    _checks.same_device("weight", weight, "hidden", hidden)
    vocab, width = weight.shape
    if width != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape [V, {hidden.shape[-1]}] (hidden's last dim), got {tuple(weight.shape)}")
    for name, d, ref_name, ref in (("d_hidden", d_hidden, "hidden", hidden), ("d_weight", d_weight, "weight", weight)):
        if d is not None or name == "d_hidden":
            _checks.float_tensor(name, d, dtypes=_DTYPES)
            _checks.same_shape(name, d, ref_name, ref)
            _checks.same_dtype(name, d, ref_name, ref)
            _checks.same_device(name, d, ref_name, ref)
    if labels is not None:
        _checks.labels_for("labels", labels, hidden, vocab, ignore_index, check_inputs)
    inv_t = 1.0 / _checks.positive("temperature", temperature)
    chunk = _chunk_size(chunk_size, vocab, hidden.device)
    acc = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):  # autocast would run the matmuls in 16 bits
        h2, dh2 = hidden.detach().reshape(-1, width), d_hidden.detach().reshape(-1, width)
        ones = torch.ones(h2.shape[0], dtype=torch.bool, device=hidden.device)
        valid = ones if labels is None else labels.reshape(-1) != ignore_index
        rows = ValidRows(valid)  # skips ignored rows where that is free; elsewhere they run and are zeroed below
        h2, dh2, valid = rows.take(h2), rows.take(dh2), rows.take(valid)
        w, dw = weight.detach().to(acc), None if d_weight is None else d_weight.detach().to(acc)
        g_h = torch.zeros(h2.shape, dtype=acc, device=hidden.device)
        g_w = None if dw is None else torch.zeros_like(w)
        for s in range(0, h2.shape[0], chunk):
            r = slice(s, min(h2.shape[0], s + chunk))
            h, dh = h2[r].to(acc), dh2[r].to(acc)
            p = torch.softmax(h @ w.T * inv_t, dim=-1)
            dz = dh @ w.T
            if dw is not None:
                dz.addmm_(h, dw.T)
            # M dz = p * (dz - <p, dz>); the 1/T of dz and the 1/T of J^T folded into one factor
            a = dz.sub_((p * dz).sum(-1, keepdim=True)).mul_(p).mul_(inv_t * inv_t)
            a = torch.where(valid[r, None], a, 0)  # an ignored row contributes nothing
            g_h[r] = a @ w
            if g_w is not None:
                g_w.addmm_(a.T, h)
        g_hidden = rows.put(g_h).to(hidden.dtype).view(hidden.shape)
    return g_hidden, None if g_w is None else g_w.to(weight.dtype)


"""KL to the reference policy: per-token estimators from log-probs, or exact over the vocabulary."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, _library
from ._backend import resolve
from ._rows import ValidRows
from .logprobs import _chunk_size, _transform

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1", *, log_ratio_clip: float | None = None) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs (Schulman 2020, "Approximating KL divergence").

    With log r = ref_logprobs - logprobs: "k1" = -log r (unbiased), "k2" = (log r)^2 / 2 (low variance, biased),
    "k3" = (r - 1) - log r (unbiased, always >= 0), "abs" = |log r|.

    k3 is unbounded: expm1(39) - 39 ~ 8.7e16. ``log_ratio_clip=c`` clamps log r to [-c, c] before the estimator
    (verl's "low_var_kl" clamps to +-20). Within the clamp the value is exactly the unclamped one; beyond it the
    value is that at +-c and the gradient w.r.t. logprobs is 0 (such a token gets no pull towards pi_ref).
    verl also clamps the k3 value to [-10, 10]; that is not done here: it would zero the gradient from
    log r ~ 2.6 on, well inside the range where the penalty must act.

    Args:
        logprobs, ref_logprobs: float tensors of one shape [...] (nats), same device.
        estimator: one of "k1", "k2", "k3", "abs".
        log_ratio_clip: None (no clamp) or a finite number > 0 (nats).
    Returns:
        [...] tensor of the inputs' (promoted) dtype, nats. Differentiable.
    Raises:
        TypeError / ValueError naming the argument.
    """
    _checks.float_tensor("logprobs", logprobs, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16))
    _checks.float_tensor("ref_logprobs", ref_logprobs, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16))
    _checks.same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    _checks.same_device("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    _checks.choice("estimator", estimator, KL_ESTIMATORS)
    clip = _checks.positive("log_ratio_clip", log_ratio_clip, allow_none=True)
    log_r = ref_logprobs - logprobs
    if clip is not None:
        log_r = log_r.clamp(-clip, clip)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        return torch.expm1(log_r) - log_r  # expm1: exact near r = 1, where the two terms cancel
    return log_r.abs()


def linear_kl(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    labels: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_size: int | None = None,
    check_inputs: bool | None = None,
) -> Tensor:
    """Exact per-token KL(pi || pi_ref) = sum_v pi(v) (log pi(v) - log pi_ref(v)) over the full vocabulary, fused.

    pi = softmax(f(hidden @ weight.T + bias)), pi_ref = softmax(f(ref_hidden @ ref_weight.T + ref_bias)), with
    f(x) = softcap * tanh(logit_scale * x / softcap) / temperature (without softcap: logit_scale * x / temperature),
    the logit transform of :func:`linear_logprobs` (which names the models' settings). One transform serves
    both distributions: the reference is a checkpoint of the same family, with the same head scale / softcap.
    Neither logits tensor is materialized beyond a chunk. Unlike the sampled estimators of :func:`kl_penalty`
    this has no variance.

    Precision, torch.compile and host syncs as in :func:`linear_logprobs`: each of hidden, weight, bias,
    ref_hidden, ref_weight, ref_bias may be float32/bfloat16/float16 on its own; fp32 compute whatever the
    inputs and the ambient autocast; float32 output, gradients in their inputs' dtypes. Custom op
    ``rlhf_fast::linear_kl``.

    Args:
        hidden: [..., H] float32/bfloat16/float16 policy hidden states; weight: [V, H] float32/bfloat16/float16.
        ref_hidden: [..., Hr] reference hidden states (same leading shape); ref_weight: [V, Hr], same V. All on
            hidden's device.
        labels: optional [...] int64; only its ``ignore_index`` positions are used (KL 0 there, no gradient).
        bias: optional [V] policy head bias; ref_bias: optional [V] reference head bias.
        temperature: > 0; logit_scale: finite > 0; softcap: None or finite > 0. Applied to both distributions.
        backend: "auto" | "torch" | "triton"; chunk_size: tokens per chunk for "torch".
        check_inputs: None | True | False: how the label values are checked (see :func:`linear_logprobs`).
    Returns:
        kl [...] float32, nats, >= 0 (up to rounding). Differentiable w.r.t. hidden, weight and bias (the reference
        is constant).
    Raises:
        TypeError / ValueError naming the argument; RuntimeError if the backend cannot run here (or for labels
        out of range, when asserted on the device).
    """
    _checks.linear_head(hidden, weight, bias)
    _checks.linear_head(ref_hidden, ref_weight, ref_bias, hidden_name="ref_hidden", weight_name="ref_weight", bias_name="ref_bias")
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ref_hidden: expected leading shape {tuple(hidden.shape[:-1])} (hidden's), got {tuple(ref_hidden.shape[:-1])}")
    _checks.same_device("ref_hidden", ref_hidden, "hidden", hidden)
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight: expected {weight.shape[0]} rows (weight's vocabulary), got {ref_weight.shape[0]}")
    vocab = weight.shape[0]
    if labels is not None:
        _checks.labels_for("labels", labels, hidden, vocab, ignore_index, check_inputs)
    tf = _transform(temperature, logit_scale, softcap)
    backend = resolve(backend, "linear_kl", hidden.device, ("torch", "triton"))
    chunk = _chunk_size(chunk_size, vocab, hidden.device, softcap is not None, backend)
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    r2 = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    valid = torch.ones(h2.shape[0], dtype=torch.bool, device=hidden.device) if labels is None else labels.reshape(-1) != ignore_index
    rows = ValidRows(valid)
    kl = _library.linear_kl(rows.take(h2), weight, bias, rows.take(r2), ref_weight, ref_bias, rows.take(valid), tf, chunk, backend)
    return rows.put(kl).view(lead)

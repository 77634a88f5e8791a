"""Token log-probs (and entropy) straight from hidden states and the LM-head weight."""
from __future__ import annotations

from torch import Tensor

from . import _checks, _library, _torch
from ._backend import resolve
from ._rows import ValidRows


def _chunk_size(chunk_size, vocab: int, device, softcap: bool = False, backend: str = "torch") -> int | None:
    """Tokens per chunk: the user's (validated), else the "torch" backend's default; None lets triton choose."""
    if chunk_size is None:
        return None if backend == "triton" else _torch.default_chunk_size(vocab, device, softcap)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    return chunk_size


def _transform(temperature, logit_scale, softcap) -> _torch.Transform:
    """The validated logit transform shared by the fused ops (see :func:`linear_logprobs`)."""
    temperature = _checks.positive("temperature", temperature)
    # a negative scale would be well defined, but no model uses one: more likely a sign slip than intended
    logit_scale = _checks.positive("logit_scale", logit_scale)
    softcap = _checks.positive("softcap", softcap, allow_none=True)
    return _torch.Transform.of(temperature, logit_scale, softcap)


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    check_inputs: bool | None = None,
):
    """Log-probability of each label under softmax(z), z the transformed logits below, fused.

    The logits are z = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap) / temperature
    (without softcap: z = logit_scale * (hidden @ weight.T + bias) / temperature), in the order the models apply
    them in transformers: the head's scale right after the lm_head matmul, then the softcap, then the sampling
    temperature. Model settings: Cohere/Command-R ``logit_scale`` -> logit_scale=config.logit_scale (logits *
    scale); Granite ``logits_scaling`` -> logit_scale=1 / config.logits_scaling (Granite divides); Falcon-H1
    ``lm_head_multiplier`` -> logit_scale=config.lm_head_multiplier; Gemma-2/3 ``final_logit_softcapping`` ->
    softcap=config.final_logit_softcapping (tanh(z / cap) * cap on the lm_head output). No model in transformers
    applies both; where both are given the scale comes first.

    The gradient goes through the transform: dz/dx = logit_scale * (1 - tanh^2) / temperature (logit_scale /
    temperature without softcap) for the raw logits x = hidden @ weight.T + bias.

    Never holds more than ``chunk_size`` x V logits ("torch") or any logits tile in global memory
    ("triton"); backward recomputes them.

    Precision: hidden, weight and bias may each be float32, bfloat16 or float16, independently (a bf16 trunk
    with an fp32 head, as TRL's ``cast_lm_head_to_fp32``). The logits are formed and reduced in fp32 whatever
    the inputs and whatever the ambient ``torch.autocast`` (nothing is downcast: the result under autocast is
    the one without); outputs are float32, and each gradient comes back in its input's dtype.

    A ``torch.library`` custom op (``rlhf_fast::linear_logprobs``): ``torch.compile`` runs it without a graph
    break, and nothing on its path reads a device value on the host unless ``check_inputs`` asks for it.

    Args:
        hidden: [..., H] float32 / bfloat16 / float16 hidden states.
        weight: [V, H] LM-head weight, float32 / bfloat16 / float16, ``hidden``'s device.
        labels: [...] int64 (``hidden``'s leading shape), each in [0, V) or ``ignore_index``.
        bias: optional [V] float32 / bfloat16 / float16 bias, ``hidden``'s device.
        temperature: > 0; logits are divided by it (use the sampling temperature when scoring rollouts).
        logit_scale: finite > 0, multiplies the head's logits (1: none).
        softcap: None (none) or finite > 0: the tanh cap, applied after logit_scale.
        ignore_index: label value whose outputs are 0 and that get no gradient.
        return_entropy: also return the entropy of the same distribution.
        backend: "auto" | "torch" | "triton" ("auto": triton on CUDA, torch on CPU).
        chunk_size: tokens per chunk for the "torch" backend (default: from a memory budget).
        check_inputs: how the label values are checked. None (default): eagerly with a ValueError on CPU
            tensors outside torch.compile, else by a device-side assert (``torch._assert_async``: no host sync;
            a failure is a RuntimeError on CPU, a device-side assert that ends the CUDA context on GPU).
            True: always eagerly (a host sync, and a graph break under torch.compile). False: not at all (an
            out-of-range label then gives undefined values). Shapes, dtypes and devices are always checked.

    Returns:
        logprobs [...] float32 in nats (<= 0), or ``(logprobs, entropy)`` with entropy [...] float32 in nats.
        Differentiable w.r.t. hidden, weight and bias through both outputs.

    Raises:
        TypeError / ValueError naming the argument for wrong dtypes, shapes, devices, labels out of range,
        temperature, logit_scale or softcap not finite and > 0; RuntimeError if the requested backend cannot run
        here (or for labels out of range, when asserted on the device: see ``check_inputs``).
    """
    _checks.linear_head(hidden, weight, bias)
    vocab = weight.shape[0]
    _checks.labels_for("labels", labels, hidden, vocab, ignore_index, check_inputs)
    tf = _transform(temperature, logit_scale, softcap)
    backend = resolve(backend, "linear_logprobs", hidden.device, ("torch", "triton"))
    chunk = _chunk_size(chunk_size, vocab, hidden.device, softcap is not None, backend)
    lead = labels.shape
    l1 = labels.reshape(-1)
    rows = ValidRows(l1 != ignore_index)
    h2, l1 = rows.take(hidden.reshape(-1, hidden.shape[-1])), rows.take(l1)
    logprobs, entropy = _library.linear_logprobs(h2, weight, bias, l1, tf, ignore_index, return_entropy, chunk, backend)
    logprobs, entropy = rows.put(logprobs), rows.put(entropy)
    if return_entropy:
        return logprobs.view(lead), entropy.view(lead)
    return logprobs.view(lead)

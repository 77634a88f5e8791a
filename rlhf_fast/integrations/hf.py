"""A fused LM head for any Hugging Face causal LM: per-token log-probs, entropy and exact KL, no logits.

:func:`add_fused_lm_head` patches ``model.forward`` (the instance attribute, as TRL's ``add_fused_lm_head`` does) so
that ``model(input_ids, attention_mask=..., labels=labels, fused_lm_head=True)`` runs the model's own backbone and
scores the next-token labels with :func:`rlhf_fast.ops.linear_logprobs` / :func:`rlhf_fast.ops.linear_kl` straight
from the last hidden states and the LM-head weight: the [tokens x vocab] logits are never formed, and positions
whose label is -100 cost nothing. Without ``fused_lm_head=True`` the forward is the original one, so ``generate``
and ordinary calls are unchanged.

Only a head whose logits the ops reproduce exactly is accepted; anything else raises (never a silently different
distribution):

- the head module must be a plain ``torch.nn.Linear`` (a subclass with its own forward, e.g. a quantized linear,
  is refused) or peft's LoRA ``Linear`` around one (folded as W + scaling * B @ A at call time, differentiable
  w.r.t. A and B), or peft's ``ModulesToSaveWrapper`` around either;
- the post-head transforms are read from the config (:func:`logit_transform`) for the model classes listed in
  ``VERIFIED_CLASSES``, each checked against its transformers (5.x) modeling code; any other class whose config
  sets one of ``LOGIT_ATTRS`` to a non-neutral value is refused, since its forward may apply it.

What is not detectable: a model class outside ``VERIFIED_CLASSES`` whose forward transforms the logits without
a config attribute of those names, and hooks registered on the head module (it is not called, except as an FSDP unit).

Tested against the unpatched models (tests/test_hf_integration.py): Llama, Qwen2, Qwen3, Mistral, Gemma-2
(softcap), Cohere (logit_scale), Granite (logits_scaling), GPT-2 (tied), Phi-3, and PEFT LoRA (backbone only,
on lm_head, modules_to_save). The other ``VERIFIED_CLASSES`` entries were checked by reading their modeling code.
FSDP2: in the root's unit (the usual wrapping; tied embeddings must be there) the head is unsharded while the
root's forward runs; a head wrapped as its own unit has its math run as that unit's forward, so FSDP all-gathers
it (one full head per rank while the op runs) and reduce-scatters its gradient as for any layer.
Not handled: the MoE router aux loss (refused), peft's per-call ``adapter_names``, DeepSpeed ZeRO-3 sharded heads.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import types
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from rlhf_fast import ops
from rlhf_fast.ops import _checks

OUTPUTS = ("log_probs", "entropy", "kl", "log_sum_sq_probs", "mean_logits", "is_top1")
BACKENDS = ("auto", "torch", "triton")

# Config attributes that some model's forward applies to the LM head's output (or its input). Checked on every
# model: on a class outside VERIFIED_CLASSES a non-neutral value of any of them is refused.
LOGIT_ATTRS = (
    "final_logit_softcapping", "final_logit_softcap", "logit_softcapping", "logits_soft_cap", "output_logit_soft_cap",
    "logit_scale", "logits_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier", "logit_multiplier",
    "logits_multiplier", "output_logits_scale", "lm_head_scale", "logits_mup_width_multiplier", "mup_width_multiplier",
)

# transformers class -> {config attribute: what its forward does with it}; LOGIT_ATTRS not listed are ignored by
# that forward. Each entry read from transformers 5.x models/*/modeling_*.py (the CausalLM forward after
# `logits = self.lm_head(hidden_states)`). "softcap": cap * tanh(logits / cap); "mul": logits * v; "div": logits / v.
def _classes(names: tuple[str, ...], roles: dict[str, str]) -> dict[str, dict[str, str]]:
    return {name: dict(roles) for name in names}


VERIFIED_CLASSES: dict[str, dict[str, str]] = {
    # logits = lm_head(hidden) and nothing else (MPT's config.logit_scale is unused by its modeling code)
    **_classes(("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM",
                "GPT2LMHeadModel", "MptForCausalLM"), {}),
    # `if config.final_logit_softcapping is not None`: logits / cap -> tanh -> * cap
    **_classes(("Gemma2ForCausalLM", "Gemma3ForCausalLM", "VaultGemmaForCausalLM", "NanoChatForCausalLM"),
               {"final_logit_softcapping": "softcap"}),
    "RecurrentGemmaForCausalLM": {"logits_soft_cap": "softcap"},  # tanh(logits / cap) * cap, unconditionally
    # logits * self.logit_scale (= config.logit_scale)
    **_classes(("CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM"), {"logit_scale": "mul"}),
    # logits / config.logits_scaling
    **_classes(("GraniteForCausalLM", "GraniteSWAForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSWAForCausalLM",
                "GraniteMoeSharedForCausalLM", "GraniteMoeHybridForCausalLM"), {"logits_scaling": "div"}),
    "HyperCLOVAXForCausalLM": {"logits_scaling": "mul"},  # MuP: multiplies where Granite divides
    "FalconH1ForCausalLM": {"lm_head_multiplier": "mul"},  # logits * self.model.lm_head_multiplier (= the config's)
    # hidden / logits_scaling before a bias-free lm_head: the same as dividing the logits
    "MiniCPM3ForCausalLM": {"logits_scaling": "div"},
}


@dataclass
class FusedCausalLMOutput(ModelOutput):
    """Output of a model patched by :func:`add_fused_lm_head` and called with ``fused_lm_head=True``.

    Every per-token field is [B, T-1] ([B, T] with ``shift_labels``), 0 (False) where the label is -100; those not
    requested in ``outputs`` are None. Distributions are those of the model's logits (with its softcap / scale)
    divided by ``temperature``; all values in nats.

    Attributes:
        loss: scalar, -sum(log_probs) / (number of valid labels, or ``num_items_in_batch`` when given).
        log_probs: float32 log-probability of each label. Differentiable.
        entropy: float32 entropy of the next-token distribution. Differentiable.
        kl: float32 exact KL(pi || pi_ref) over the vocabulary against ``ref_model``. Differentiable (pi side).
        log_sum_sq_probs: float32 log(sum_v p_v^2), no gradient.
        mean_logits: float32 mean over the vocabulary of the temperature-scaled logits, no gradient.
        is_top1: bool, whether the label is the argmax (the first one on ties, as torch.argmax).
        label_mask: bool, label != -100.
    """

    loss: Tensor | None = None
    log_probs: Tensor | None = None
    entropy: Tensor | None = None
    kl: Tensor | None = None
    log_sum_sq_probs: Tensor | None = None
    mean_logits: Tensor | None = None
    is_top1: Tensor | None = None
    label_mask: Tensor | None = None


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (its LoRA layers are injected in place), else ``model``."""
    try:
        from peft import PeftModel
    except ImportError:
        return model
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "get_output_embeddings", None)):
        raise TypeError(f"model: expected a transformers PreTrainedModel (or a peft wrapper of one), got {type(model).__name__}")
    get_text = getattr(config, "get_text_config", None)
    return get_text() if get_text is not None else config


def _neutral(attr: str, value) -> bool:
    # a cap of 1 still caps; a scale of 1 does nothing
    return value is None or ("cap" not in attr and not isinstance(value, bool) and value == 1)


def logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """(logit_scale, softcap) for :func:`rlhf_fast.ops.linear_logprobs` that reproduce ``model``'s logits.

    Read from ``model.config.get_text_config()`` for the classes in ``VERIFIED_CLASSES`` (Cohere ``logit_scale``:
    multiply; Granite ``logits_scaling``: divide, i.e. logit_scale = 1 / logits_scaling; HyperCLOVA X: multiply;
    Falcon-H1 ``lm_head_multiplier``: multiply; Gemma-2/3 ``final_logit_softcapping``: softcap).

    Raises:
        TypeError: ``model`` is not a transformers model. ValueError: the class is not verified and its config sets
        a logit-altering attribute (``LOGIT_ATTRS``), or a verified one holds a value that is not finite and > 0.
    """
    inner = _unwrap(model)
    config = _text_config(inner)
    cls = type(inner)
    verified = VERIFIED_CLASSES.get(cls.__name__) if cls.__module__.startswith("transformers.") else None
    scale, softcap = 1.0, None
    for attr in LOGIT_ATTRS:
        value = getattr(config, attr, None)
        role = None if verified is None else verified.get(attr)
        if role is None:
            if verified is None and not _neutral(attr, value):
                raise ValueError(
                    f"model: config.{attr}={value!r} may transform the logits of {cls.__module__}.{cls.__qualname__}, "
                    f"a class whose forward has not been verified (rlhf_fast.integrations.hf.VERIFIED_CLASSES); "
                    f"the fused head would score a different distribution")
            continue
        if value is None:
            continue  # e.g. Gemma-2 without a cap: its forward checks `is not None` too
        value = _checks.positive(f"config.{attr}", value)
        if role == "softcap":
            softcap = value
        elif role == "mul":
            scale *= value
        else:
            scale /= value
    return scale, softcap


def _plain_linear(m: nn.Module) -> bool:
    # a subclass with its own forward (bitsandbytes, custom heads) computes something else from its weight
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _describe(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _fold_lora(head: nn.Module, what: str, check_dropout: bool) -> tuple[Tensor, Tensor | None]:
    """(W + scaling * B @ A, b + scaling * B.bias) of a peft LoRA Linear, as its forward computes it."""
    base = head.get_base_layer()
    if not _plain_linear(base):
        raise ValueError(f"{what}: the LoRA head wraps a {_describe(base)}, not a torch.nn.Linear")
    if getattr(head, "fan_in_fan_out", False):
        raise ValueError(f"{what}: LoRA head with fan_in_fan_out=True is not supported")
    weight, bias = base.weight, base.bias
    if head.disable_adapters:
        if head.merged:  # peft's forward would unmerge first (mutating the weight): leave that to the caller
            raise ValueError(f"{what}: the LoRA head is merged while adapters are disabled; call unmerge_adapter() first")
        return weight, bias
    if head.merged:  # the deltas are in the base weight, and peft's forward uses the base layer alone
        return weight, bias
    active = [a for a in head.active_adapters if a in head.lora_A]
    if not active:
        return weight, bias
    if len(active) > 1:
        raise ValueError(f"{what}: {len(active)} active LoRA adapters on the head ({', '.join(active)}); only one is folded")
    name = active[0]
    if name in getattr(head, "lora_variant", {}) or getattr(head, "use_dora", {}).get(name, False):
        raise ValueError(f"{what}: the LoRA adapter {name!r} on the head is a variant (e.g. DoRA), which is not folded")
    dropout = head.lora_dropout[name]
    if check_dropout and not (isinstance(dropout, nn.Identity) or not dropout.training or (isinstance(dropout, nn.Dropout) and dropout.p == 0)):
        raise ValueError(f"{what}: the LoRA adapter {name!r} on the head has dropout p={getattr(dropout, 'p', '?')} in "
                         "training mode; a folded weight cannot reproduce it (set lora_dropout=0 or call eval())")
    lora_a, lora_b = head.lora_A[name], head.lora_B[name]
    if not (_plain_linear(lora_a) and _plain_linear(lora_b)) or lora_a.bias is not None:
        raise ValueError(f"{what}: the LoRA adapter {name!r} on the head is not a pair of linear maps (A without bias)")
    scaling = head.scaling[name]
    weight = weight + (scaling * (lora_b.weight @ lora_a.weight)).to(weight.dtype)
    if lora_b.bias is not None:  # peft's lora_bias=True (it requires a base bias)
        bias = bias + (scaling * lora_b.bias).to(bias.dtype)
    return weight, bias


def _head_params(head: nn.Module | None, what: str, check_dropout: bool = True) -> tuple[Tensor, Tensor | None]:
    """(weight [V, H], bias [V] or None) whose affine map is exactly what ``head`` computes; raises otherwise.

    ``check_dropout=False`` at patch time: whether dropout is active depends on train() / eval() at call time.
    """
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        LoraLinear = ModulesToSaveWrapper = None
    if ModulesToSaveWrapper is not None and isinstance(head, ModulesToSaveWrapper):
        # its forward: the original module when disabled or an active adapter has no copy, else the first one's copy
        if head.disable_adapters or not head.active_adapters or any(a not in head.modules_to_save for a in head.active_adapters):
            head = head.original_module
        else:
            head = head.modules_to_save[head.active_adapters[0]]
    if _plain_linear(head):
        weight, bias = head.weight, head.bias
    elif LoraLinear is not None and type(head) is LoraLinear:
        weight, bias = _fold_lora(head, what, check_dropout)
    else:
        kind = "None" if head is None else _describe(head)
        raise ValueError(f"{what}: the output embeddings are a {kind}, not a torch.nn.Linear or a peft LoRA Linear: "
                         "the fused head reproduces only logits = hidden @ weight.T + bias")
    if weight.device.type == "meta":
        raise ValueError(f"{what}: the head weight is on the meta device (offloaded?); it must be materialized")
    return _full(weight), _full(bias)


def _full(t: Tensor | None) -> Tensor | None:
    # FSDP2 shards parameters as DTensors while the backbone hands back plain tensors: gather the head
    if t is not None and hasattr(t, "full_tensor") and type(t).__name__ == "DTensor":
        return t.full_tensor()
    return t


class LMHead(NamedTuple):
    """What reproduces a causal LM's logits from its last hidden states h: f(h @ weight.T + bias), f as
    :func:`rlhf_fast.ops.linear_logprobs` applies ``logit_scale`` and ``softcap``."""

    weight: Tensor  # [V, H], the head's dtype; differentiable (a folded LoRA head: w.r.t. its adapters)
    bias: Tensor | None  # [V] or None
    logit_scale: float
    softcap: float | None


def lm_head_params(model: nn.Module) -> LMHead:
    """The LM head of ``model`` (a transformers causal LM or a peft wrapper of one) as the fused ops take it.

    Read at call time: a LoRA adapter on the head is folded now (W + scaling * B @ A, with its graph; the base
    weight while adapters are disabled), so call it again after the parameters or the adapter state change.

    Returns:
        LMHead(weight [V, H], bias [V] or None, logit_scale, softcap): (weight, bias) from :func:`_head_params`
        (plain / tied Linear, peft LoRA Linear, ModulesToSaveWrapper), the transform from :func:`logit_transform`.
    Raises:
        TypeError: not a transformers model. ValueError: a head the ops cannot reproduce (not a Linear, a LoRA
        variant or an active LoRA dropout on it, meta weights), or an unverified logit-altering config attribute.
    """
    inner = _unwrap(model)
    scale, softcap = logit_transform(inner)
    weight, bias = _head_params(inner.get_output_embeddings(), "model")
    return LMHead(weight, bias, scale, softcap)


def _fsdp_unit(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def _as_forward(module: nn.Module, fn, *args):
    """``fn(*args)`` run as ``module``'s forward, through its ``__call__``: FSDP2's hooks on an FSDP unit then
    all-gather its parameters before, and reduce-scatter their gradients after backward, as for its own forward.
    (A sharded weight read outside that, with ``DTensor.full_tensor()``, gets back only this rank's tokens' share
    of the gradient.)"""
    module.forward = fn  # an instance attribute shadows the class's forward for this one call
    try:
        return module(*args)
    finally:
        del module.forward


def _backbone(model: nn.Module, what: str) -> nn.Module:
    body = model.base_model  # looked up per call: FSDP / PEFT replace modules after patching
    if body is model:
        raise ValueError(f"{what}: {type(model).__name__} has no backbone under base_model_prefix={model.base_model_prefix!r}")
    return body


def _last_hidden(out) -> Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    # under autocast the model's own lm_head matmul runs in the autocast dtype
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype


def _cast(dtype, *ts):
    return tuple(None if t is None else t.to(dtype) for t in ts)


@torch.no_grad()
def _stats(hidden, weight, bias, labels, mask, temperature, scale, softcap, wanted, budget: int = 1 << 24) -> dict:
    """log_sum_sq_probs / mean_logits / is_top1 over the valid rows, chunked to ~``budget`` logits at a time.

    Costs one extra (no-grad) head matmul over the valid rows. Logits are formed as the model does (matmul in the
    head's dtype), then the transform runs in fp32.
    """
    flat = mask.reshape(-1)
    rows = flat.nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    y = labels.reshape(-1).index_select(0, rows)
    step = max(1, budget // weight.shape[0])
    parts: dict[str, list[Tensor]] = {k: [] for k in wanted}
    for s in range(0, h.shape[0], step):
        x = h[s:s + step] @ weight.T
        if bias is not None:
            x = x + bias
        z = x.float() * scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        if "log_sum_sq_probs" in parts:  # log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)
            parts["log_sum_sq_probs"].append(torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1))
        if "mean_logits" in parts:
            parts["mean_logits"].append(z.mean(-1))
        if "is_top1" in parts:
            parts["is_top1"].append(z.argmax(-1) == y[s:s + step])
    out = {}
    for k, chunks in parts.items():
        dtype = torch.bool if k == "is_top1" else torch.float32
        vals = torch.cat(chunks) if chunks else torch.empty(0, dtype=dtype, device=hidden.device)
        out[k] = torch.zeros(flat.shape, dtype=dtype, device=hidden.device).index_copy(0, rows, vals).view(mask.shape)
    return out


def add_fused_lm_head(model: nn.Module, temperature: float = 1.0, outputs=("log_probs",), ref_model: nn.Module | None = None,
                      backend: str = "auto", cast_lm_head_to_fp32: bool = False) -> nn.Module:
    """Give ``model`` a fused LM head: ``model(..., labels=labels, fused_lm_head=True)`` -> :class:`FusedCausalLMOutput`.

    The patched call runs the model's backbone (``model.base_model``, looked up at call time), shifts
    (hidden[:, :-1] against labels[:, 1:]; pre-shifted ``shift_labels=`` are used as given), moves both to the head
    weight's device (``device_map``), and computes the requested per-token fields at the positions whose label is
    not -100 with :func:`rlhf_fast.ops.linear_logprobs` (and :func:`rlhf_fast.ops.linear_kl`), on the head weight
    read at call time (tied embeddings included; a LoRA adapter on the head folded in). ``num_items_in_batch=``
    divides the loss as in transformers. Other keyword arguments go to the backbone (``use_cache=False``).
    Without ``fused_lm_head=True`` the call is the original forward. Patch before or after peft's
    ``get_peft_model`` (a peft model is patched on its inner transformers model). ``model.forward`` keeps its
    signature, so ``generate`` and DDP/FSDP wrappers work as before.

    Args:
        model: a transformers causal LM (a ``*ForCausalLM``), or a peft wrapper of one.
        temperature: > 0, the logits (after the model's own softcap / scale) are divided by it.
        outputs: names among ``OUTPUTS``: "log_probs" (always computed: the loss), "entropy", "kl" (exact
            KL(pi || pi_ref), needs ``ref_model``), and the no-grad diagnostics "log_sum_sq_probs", "mean_logits",
            "is_top1" (one extra head matmul over the valid rows).
        ref_model: the reference causal LM for "kl" (same vocabulary and logit transform); its backbone runs under
            no_grad on the same inputs (``input_ids``, not ``inputs_embeds``). Put it in eval mode yourself.
        backend: "auto" | "torch" | "triton", passed to the ops.
        cast_lm_head_to_fp32: run the head (hidden states, weight, bias) in float32 with autocast off, as TRL's
            ``cast_lm_head_to_fp32``; otherwise in the autocast dtype when autocast is on, else the weight's dtype.

    Returns:
        ``model`` (patched in place).

    Raises:
        TypeError: ``model`` / ``ref_model`` is not a transformers model, ``outputs`` is not a tuple or list,
        ``cast_lm_head_to_fp32`` is not a bool.
        ValueError: bad ``temperature``, ``backend``, an unknown name in ``outputs``; "kl" without ``ref_model`` (or
        the reverse); a head that cannot be reproduced (see the module docstring), a reference with another
        vocabulary or transform; a model already patched.
        At call time: ValueError for missing labels, ``logits_to_keep`` != 0, router logits (MoE aux loss is not
        added), ``inputs_embeds`` with "kl".
    """
    temperature = _checks.positive("temperature", temperature)
    _checks.choice("backend", backend, BACKENDS)
    if not isinstance(cast_lm_head_to_fp32, bool):
        raise TypeError(f"cast_lm_head_to_fp32: expected a bool, got {cast_lm_head_to_fp32!r}")
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list)):
        raise TypeError(f"outputs: expected a tuple of names among {OUTPUTS}, got {outputs!r}")
    for name in outputs:
        if name not in OUTPUTS:
            raise ValueError(f"outputs: unknown output {name!r}; supported: {', '.join(OUTPUTS)}")
    outputs = frozenset(outputs) | {"log_probs"}
    if ("kl" in outputs) != (ref_model is not None):
        raise ValueError("ref_model: 'kl' in outputs needs ref_model, and ref_model is used only for 'kl'")

    inner = _unwrap(model)
    text_config = _text_config(inner)
    if getattr(inner.forward, "_rlhf_fast_fused", False):
        raise ValueError("model: add_fused_lm_head was already applied to this model")
    scale, softcap = logit_transform(inner)
    weight, _ = _head_params(inner.get_output_embeddings(), "model", False)  # fail early; re-read at every call
    ref_inner = None
    if ref_model is not None:
        ref_inner = _unwrap(ref_model)
        _text_config(ref_inner)
        if logit_transform(ref_inner) != (scale, softcap):
            raise ValueError(f"ref_model: logit transform (logit_scale, softcap)={logit_transform(ref_inner)} differs from "
                             f"the model's {(scale, softcap)}; linear_kl applies one transform to both")
        ref_weight, _ = _head_params(ref_inner.get_output_embeddings(), "ref_model", False)
        if ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"ref_model: vocabulary {ref_weight.shape[0]} differs from the model's {weight.shape[0]}")
    stats = [k for k in ("log_sum_sq_probs", "mean_logits", "is_top1") if k in outputs]
    original_forward = inner.forward
    sig = inspect.signature(original_forward)
    positional = [p.name for p in sig.parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]

    def fused(self, args, kwargs) -> FusedCausalLMOutput:
        if len(args) > len(positional):
            raise TypeError(f"forward: expected at most {len(positional)} positional arguments, got {len(args)}")
        call = dict(zip(positional, args))
        for k, v in kwargs.items():
            if k in call:
                raise TypeError(f"forward: got multiple values for argument {k!r}")
            call[k] = v
        labels, shift_labels = call.pop("labels", None), call.pop("shift_labels", None)
        num_items = call.pop("num_items_in_batch", None)
        if call.pop("logits_to_keep", None) not in (None, 0):
            raise ValueError("logits_to_keep: not supported with fused_lm_head=True (positions are chosen by the labels)")
        call.pop("return_dict", None)
        call = {k: v for k, v in call.items() if v is not None}  # peft passes output_attentions=None and the like
        call["use_cache"] = False
        if call.get("output_router_logits") or getattr(text_config, "output_router_logits", False):
            raise ValueError("output_router_logits: the MoE load-balancing loss is not added by the fused head; "
                             "set config.output_router_logits=False")
        if labels is None and shift_labels is None:
            raise ValueError("labels: fused_lm_head=True needs labels (or shift_labels)")
        if ref_inner is not None and "inputs_embeds" in call:
            raise ValueError("inputs_embeds: 'kl' runs ref_model on input_ids; the policy's embeddings are not its own")
        hidden = _last_hidden(_backbone(self, "model")(**call))
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels

        def head_part(hidden: Tensor, labels: Tensor):  # hidden [B, T, H] and labels [B, T], already shifted
            weight, bias = _head_params(self.get_output_embeddings(), "model")
            hidden, labels = hidden.to(weight.device), labels.to(weight.device)
            head_dtype = torch.float32 if cast_lm_head_to_fp32 else _compute_dtype(weight.device, weight.dtype)
            hidden, weight, bias = _cast(head_dtype, hidden, weight, bias)
            # TRL's cast_lm_head_to_fp32: the head's matmuls in fp32 even under autocast (the backbones keep autocast)
            head_ctx = (functools.partial(torch.autocast, weight.device.type, enabled=False) if cast_lm_head_to_fp32
                        else contextlib.nullcontext)
            mask = labels != -100
            common = {"temperature": temperature, "logit_scale": scale, "softcap": softcap, "backend": backend}
            with head_ctx():
                res = ops.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy="entropy" in outputs, **common)
            log_probs, entropy = res if "entropy" in outputs else (res, None)
            kl = None
            if ref_inner is not None:
                with torch.no_grad():
                    ref_hidden = _last_hidden(_backbone(ref_inner, "ref_model")(**call))
                    ref_hidden = ref_hidden[:, :-1] if shift_labels is None else ref_hidden
                    ref_weight, ref_bias = _head_params(ref_inner.get_output_embeddings(), "ref_model")
                    ref_hidden = ref_hidden.to(weight.device)
                    ref_dtype = head_dtype if cast_lm_head_to_fp32 else _compute_dtype(weight.device, ref_weight.dtype)
                    ref_hidden, ref_weight, ref_bias = _cast(ref_dtype, ref_hidden, ref_weight.to(weight.device),
                                                             None if ref_bias is None else ref_bias.to(weight.device))
                with head_ctx():
                    kl = ops.linear_kl(hidden, weight, ref_hidden, ref_weight, labels, bias=bias, ref_bias=ref_bias, **common)
            with head_ctx():
                extra = _stats(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), labels, mask,
                               temperature, scale, softcap, stats) if stats else {}
            return log_probs, entropy, kl, mask, extra

        head = self.get_output_embeddings()
        if _fsdp_unit(head):  # its own FSDP2 unit (not the root's): sharded outside its forward, so run as that forward
            log_probs, entropy, kl, mask, extra = _as_forward(head, head_part, hidden, labels)
        else:
            log_probs, entropy, kl, mask, extra = head_part(hidden, labels)
        denom = mask.sum().clamp(min=1) if num_items is None else num_items
        return FusedCausalLMOutput(loss=-log_probs.sum() / denom, log_probs=log_probs, entropy=entropy, kl=kl,
                                   label_mask=mask, **extra)

    # The original signature (functools.wraps sets __wrapped__): generate validates its kwargs against it.
    @functools.wraps(type(inner).forward)
    def forward(self, *args, fused_lm_head: bool = False, **kwargs):
        if not fused_lm_head:
            return original_forward(*args, **kwargs)
        return fused(self, args, kwargs)

    forward._rlhf_fast_fused = True
    inner.forward = types.MethodType(forward, inner)
    return model

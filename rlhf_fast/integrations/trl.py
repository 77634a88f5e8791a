"""TRL 1.16's trainers on rlhf_fast's fused head: :func:`use_rlhf_fast`.

TRL 1.16 gives its models a fused LM head with ``trl.trainer.utils.add_fused_lm_head(model, temperature,
cast_lm_head_to_fp32, outputs)``, imported by name into the GRPO, RLOO, DPO, SFT and KTO trainer modules (and
``trl.experimental.async_grpo``). :func:`use_rlhf_fast` rebinds that name in every loaded ``trl.*`` module to an
adapter with the same signature that patches the model with :func:`rlhf_fast.integrations.hf.add_fused_lm_head`
(same ``model(..., labels=labels, fused_lm_head=True)`` contract, rlhf_fast's ops underneath). :func:`restore`
rebinds TRL's own function; models patched in between keep rlhf_fast's head.

The adapter hands a model back to TRL's own head (with a warning) where rlhf_fast's head would not reproduce it:
a head :func:`~rlhf_fast.integrations.hf.add_fused_lm_head` refuses (quantized, an unverified logit transform, ...)
and MoE models (a config with ``output_router_logits``: TRL adds the router load-balancing loss, rlhf_fast's head
does not).

``use_rlhf_fast(fused_loss=True)`` also replaces ``GRPOTrainer._compute_loss``: the clipped policy loss, its
gradient, the per-token log-probs and entropies come from one :func:`rlhf_fast.ops.linear_ppo_loss` call on the
last hidden states (3 matmul passes over tokens x hidden x vocab instead of TRL's 4: log-probs forward, then
backward through its chunked head). Matched exactly (same loss value and gradient, same logged ``kl``,
``entropy`` and ``clip_ratio/*``), else TRL's own ``_compute_loss`` runs (see :func:`grpo_fused_loss_unsupported`):

- ``loss_type`` "grpo", "bnpo", "dr_grpo", "dapo"; ``importance_sampling_level`` "token" or "sequence" (GSPO,
  linear_ppo_loss's 4-pass route when old log-probs are stored); ``epsilon`` / ``epsilon_high``; ``delta``
  (dual clip) when > 1 + epsilon_high (below, TRL's clamp is not a dual clip); ``beta > 0`` (k3 against the
  reference log-probs) with ``use_bias_correction_kl=False`` (TRL's default True weights the KL by the ratio,
  which linear_ppo_loss does not); any ``temperature`` and ``cast_lm_head_to_fp32``;
- not: ``top_entropy_quantile < 1``, an entropy bonus (``entropy_coef`` / adaptive), ``off_policy_mask_threshold``,
  vLLM importance-sampling correction, tool masks, multimodal inputs, MoE aux loss, loss types cispo / sapo /
  vespo / luspo, a subclass overriding ``_get_per_token_logps_and_entropies``, a model without rlhf_fast's head.

On-policy steps (TRL stores no old log-probs and uses ``per_token_logps.detach()``: the ratio is exactly 1 with
the gradient of REINFORCE, -A dlogp) call linear_ppo_loss with ``old_logprobs=None``, which is that: 3 passes. The loss value TRL reports is recomputed from the
per-token log-probs with TRL's formula; the gradient is linear_ppo_loss's, rescaled to TRL's normalisation. One
difference: rlhf_fast clamps log-ratios to +-20 nats (exp(20) ~ 5e8), TRL does not.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import types
import warnings
import weakref

import torch

from rlhf_fast import ops
from rlhf_fast.integrations import hf

__all__ = ["grpo_fused_loss_unsupported", "restore", "rlhf_fast_trl", "use_rlhf_fast"]

SUPPORTED_TRL = (1, 16)
TRAINER_MODULES = ("trl.trainer.utils", "trl.trainer.grpo_trainer", "trl.trainer.rloo_trainer", "trl.trainer.dpo_trainer",
                   "trl.trainer.sft_trainer", "trl.trainer.kto_trainer")
FUSED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
_NAME = "add_fused_lm_head"
_NO_INSTANCE_FORWARD = object()


class _State:
    active = False
    fused_loss = False
    trl_add_fused_lm_head = None  # TRL's own function, captured on first use
    trl_compute_loss = None  # GRPOTrainer.__dict__["_compute_loss"]


_hooked: weakref.WeakSet = weakref.WeakSet()  # models whose forward takes rlhf_fast_loss= (fused_loss)


def _check_trl():
    try:
        import trl
    except ImportError as e:
        raise ImportError("use_rlhf_fast: trl is not installed; it needs trl 1.16.x (pip install 'rlhf-fast[trl]')") from e
    from packaging.version import InvalidVersion, Version

    found = getattr(trl, "__version__", "unknown")
    try:
        ok = Version(found).release[:2] == SUPPORTED_TRL
    except InvalidVersion:
        ok = False
    if not ok:
        raise ImportError(f"use_rlhf_fast: needs trl 1.16.x (its add_fused_lm_head and GRPOTrainer._compute_loss were "
                          f"read for that version), found trl {found}")
    return trl


def _fall_back(model, temperature, cast_lm_head_to_fp32, outputs, why: str):
    warnings.warn(f"use_rlhf_fast: {why}; {type(model).__name__} gets TRL's own fused LM head", stacklevel=3)
    return _State.trl_add_fused_lm_head(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                                        outputs=outputs)


def _unpatch(inner) -> None:
    """Undo this adapter's patch of ``inner`` (so that a second trainer can re-patch with its own settings)."""
    fwd = inner.__dict__.get("forward")
    prev = getattr(getattr(fwd, "__func__", None), "_rlhf_fast_trl_prev", None)
    if prev is None:
        return
    if prev is _NO_INSTANCE_FORWARD:
        del inner.forward
    else:
        inner.forward = prev
    _hooked.discard(inner)


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False, outputs=("log_probs",)) -> None:
    """TRL 1.16's ``add_fused_lm_head`` signature, rlhf_fast's head: what :func:`use_rlhf_fast` puts in TRL's modules.

    Patches ``model`` (a transformers causal LM; TRL passes peft models unwrapped) with
    :func:`rlhf_fast.integrations.hf.add_fused_lm_head`, and adds the ``rlhf_fast_loss=`` hook that
    ``fused_loss=True`` calls. A model this adapter patched before is re-patched with the new settings. Models
    rlhf_fast's head refuses, and MoE models, get TRL's own head (with a warning). Returns None, as TRL's.
    """
    if _State.trl_add_fused_lm_head is None:
        _check_trl()
        _capture_trl()
    inner = hf._unwrap(model)
    _unpatch(inner)
    try:
        text_config = hf._text_config(inner)
    except TypeError as e:
        return _fall_back(model, temperature, cast_lm_head_to_fp32, outputs, str(e))
    if hasattr(text_config, "output_router_logits"):
        return _fall_back(model, temperature, cast_lm_head_to_fp32, outputs,
                          "an MoE model (TRL adds its router load-balancing loss, rlhf_fast's head does not)")
    prev = inner.__dict__.get("forward", _NO_INSTANCE_FORWARD)
    try:
        hf.add_fused_lm_head(inner, temperature=temperature, outputs=tuple(outputs),
                             cast_lm_head_to_fp32=bool(cast_lm_head_to_fp32))
    except (TypeError, ValueError) as e:
        return _fall_back(model, temperature, cast_lm_head_to_fp32, outputs, f"rlhf_fast's head refused the model ({e})")
    fused_forward = inner.forward
    temperature, cast = float(temperature), bool(cast_lm_head_to_fp32)

    @functools.wraps(type(inner).forward)
    def forward(self, *args, rlhf_fast_loss=None, **kwargs):
        if rlhf_fast_loss is None:
            return fused_forward(*args, **kwargs)
        if args:
            raise TypeError("forward: rlhf_fast_loss= takes keyword arguments only")
        return _run_loss(self, kwargs, rlhf_fast_loss, temperature, cast)

    forward._rlhf_fast_fused = True  # hf.add_fused_lm_head's marker: it refuses to patch twice
    forward._rlhf_fast_trl_prev = prev
    inner.forward = types.MethodType(forward, inner)
    _hooked.add(inner)
    return None


def _run_loss(model, kwargs, loss_fn, temperature, cast):
    """The backbone on ``kwargs``, then ``loss_fn(hidden [B, T, H], weight, bias, transform)`` on the head, as
    hf.add_fused_lm_head prepares them (head dtype, device, logit transform)."""
    call = {k: v for k, v in kwargs.items() if v is not None and k not in ("return_dict", "labels")}
    call["use_cache"] = False
    hidden = hf._last_hidden(hf._backbone(model, "model")(**call))
    weight, bias = hf._head_params(model.get_output_embeddings(), "model")
    hidden = hidden.to(weight.device)
    dtype = torch.float32 if cast else hf._compute_dtype(weight.device, weight.dtype)
    hidden, weight, bias = hf._cast(dtype, hidden, weight, bias)
    scale, softcap = hf.logit_transform(model)
    transform = {"temperature": temperature, "logit_scale": scale, "softcap": softcap}
    with torch.autocast(weight.device.type, enabled=False) if cast else contextlib.nullcontext():
        return loss_fn(hidden, weight, bias, transform)


def grpo_fused_loss_unsupported(trainer, inputs: dict | None = None) -> str | None:
    """Why ``fused_loss=True`` hands this GRPO step to TRL's own ``_compute_loss`` (None: it does not).

    ``trainer``: a ``trl.GRPOTrainer``; ``inputs``: the batch ``_compute_loss`` receives (the input-dependent
    checks are skipped without it).
    """
    from trl.trainer.grpo_trainer import GRPOTrainer

    args = trainer.args
    if trainer.loss_type not in FUSED_LOSS_TYPES:
        return f"loss_type={trainer.loss_type!r} (fused: {', '.join(FUSED_LOSS_TYPES)})"
    if trainer.importance_sampling_level not in ("token", "sequence"):
        return f"importance_sampling_level={trainer.importance_sampling_level!r}"
    if trainer.top_entropy_quantile < 1.0:
        return f"top_entropy_quantile={trainer.top_entropy_quantile} (< 1: high-entropy token mask)"
    if trainer._entropy_bonus_enabled:
        return "an entropy bonus (entropy_coef != 0 or use_adaptive_entropy)"
    if trainer.off_policy_mask_threshold is not None:
        return "off_policy_mask_threshold is set"
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        return "vLLM importance-sampling correction"
    if trainer.beta != 0.0 and args.use_bias_correction_kl:
        return "beta != 0 with use_bias_correction_kl=True (the KL weighted by the ratio)"
    if args.delta is not None and not args.delta > 1.0 + trainer.epsilon_high:
        return f"delta={args.delta} <= 1 + epsilon_high (not a dual clip)"
    if trainer.aux_loss_enabled:
        return "the MoE router aux loss"
    if type(trainer)._get_per_token_logps_and_entropies is not GRPOTrainer._get_per_token_logps_and_entropies:
        return f"{type(trainer).__name__} overrides _get_per_token_logps_and_entropies"
    if hf._unwrap(trainer.model) not in _hooked:
        return "the model does not have rlhf_fast's fused head (TRL's own head, or patched before use_rlhf_fast())"
    if inputs is not None:
        if "tool_mask" in inputs:
            return "tool masks"
        mm = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
        if mm:
            return f"multimodal inputs ({', '.join(mm)})"
        # on-policy, a sequence ratio's gradient equals a token ratio's only for advantages constant over a row
        adv = inputs["advantages"]
        per_token_adv = adv.dim() != 1 and not (adv.dim() == 2 and adv.shape[1] == 1)
        if per_token_adv and inputs.get("old_per_token_logps") is None and trainer.importance_sampling_level == "sequence":
            return "per-token advantages with an on-policy sequence-level ratio"
    return None


def _fused_grpo_loss(self, model, inputs):
    """GRPOTrainer._compute_loss (TRL 1.16) with the loss from rlhf_fast.ops.linear_ppo_loss (see the module doc)."""
    from trl.trainer.utils import nanmax, nanmin

    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, mask], dim=1)
    n_completion = completion_ids.size(1)
    valid = mask != 0
    labels = completion_ids.masked_fill(~valid, -100)
    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = inputs.get("old_per_token_logps")
    ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
    level, loss_type = self.importance_sampling_level, self.loss_type
    mode = "train" if self.model.training else "eval"
    accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    agg = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
           "dapo": "token-mean"}[loss_type]
    stats = {}

    def loss_fn(hidden, weight, bias, transform):
        # position t's hidden state scores token t + 1: the completion's tokens are scored from T - C - 1 on
        h = hidden[:, -n_completion - 1:-1]
        adv = advantages.expand(labels.shape).float()
        common = {"bias": bias, **transform, "loss_agg": agg, "loss_norm_length": self.max_completion_length,
                  "ref_logprobs": None if ref is None else ref.float(), "kl_coef": float(self.beta),
                  "kl_estimator": "k3", "kl_log_ratio_clip": None}
        # old=None: on-policy, ratio exactly 1 with its gradient (-A dlogp), as TRL's per_token_logps.detach()
        loss, st = ops.linear_ppo_loss(h, weight, labels, None if old is None else old.float(), adv, valid,
                                       clip_eps=self.epsilon_low, clip_eps_high=self.epsilon_high, dual_clip=self.args.delta,
                                       importance_ratio=level, **common)
        stats.update(st)
        return loss

    with self.accelerator.autocast():
        loss = model(input_ids=input_ids, attention_mask=attention_mask, rlhf_fast_loss=loss_fn)

    # TRL's per-token terms and aggregation, from the detached log-probs: the value it reports and its metrics
    with torch.no_grad():
        per_token_logps, entropies = stats["logprobs"], stats["entropies"]
        log_ratio = per_token_logps - (per_token_logps if old is None else old)
        if level == "token":
            log_importance_weights = log_ratio
        else:
            log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef_1 = torch.exp(log_importance_weights)
        if self.beta != 0.0:
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
        coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)
        if self.args.delta is not None:
            coef_1 = torch.clamp(coef_1, max=self.args.delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
        if self.beta != 0.0:
            per_token_loss = per_token_loss + self.beta * per_token_kl
        # value: TRL's; scale: from linear_ppo_loss's aggregation to TRL's
        if loss_type == "grpo":  # TRL averages over all rows, seq-mean-token-mean over rows with a valid token
            value = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accum
            scale = (mask.sum(-1) > 0).sum().clamp(min=1) / (mask.size(0) * accum)
        elif loss_type == "bnpo":
            value = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / accum
            scale = 1.0 / accum
        elif loss_type == "dr_grpo":
            value = (per_token_loss * mask).sum() / (per_token_loss.size(0) * self.max_completion_length) / accum
            scale = 1.0 / accum
        else:  # dapo: `num_items_in_batch` spans the generation batch
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            value = (per_token_loss * mask).sum() / normalizer
            scale = mask.sum().clamp(min=1.0) / normalizer
    loss = loss * scale
    loss = loss + (value - loss.detach())

    def masked_seq_mean(x):
        if x.shape[1] == 1:
            return x.squeeze(1)
        return (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            local_sum, local_count = (x * mask).sum(), mask.sum().float()
        totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    metrics = self._metrics[mode]
    if self.beta != 0.0:
        metrics["kl"].append(global_masked_mean(per_token_kl))
    metrics["entropy"].append(global_masked_mean(entropies))
    is_low_clipped = (coef_1 < 1 - self.epsilon_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + self.epsilon_high) & (advantages > 0)
    is_region_clipped = is_low_clipped | is_high_clipped
    metrics["clip_ratio/low_mean"].append(global_masked_mean(is_low_clipped.float()))
    metrics["clip_ratio/high_mean"].append(global_masked_mean(is_high_clipped.float()))
    metrics["clip_ratio/region_mean"].append(global_masked_mean(is_region_clipped.float()))
    metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(is_low_clipped.float()))).item())
    metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(is_high_clipped.float()))).item())
    return loss


def _grpo_compute_loss(self, model, inputs):
    why = grpo_fused_loss_unsupported(self, inputs)
    if why is None:
        return _fused_grpo_loss(self, model, inputs)
    if getattr(self, "_rlhf_fast_warned", None) != why:
        self._rlhf_fast_warned = why
        warnings.warn(f"use_rlhf_fast(fused_loss=True): TRL's own GRPO loss for this step: {why}", stacklevel=2)
    return _State.trl_compute_loss(self, model, inputs)


def _capture_trl() -> None:
    import trl.trainer.utils as trl_utils

    current = trl_utils.__dict__[_NAME]
    if current is not add_fused_lm_head:
        _State.trl_add_fused_lm_head = current


def _rebind(old, new) -> None:
    # every loaded trl module holding `old` under the name (the trainers import it by name; lazy trl.trainer
    # caches it after first access); __dict__ so that lazy modules are not made to import anything
    for name, module in list(sys.modules.items()):
        if not (name == "trl" or name.startswith("trl.")) or module is None:
            continue
        if getattr(module, "__dict__", {}).get(_NAME) is old:
            setattr(module, _NAME, new)


def use_rlhf_fast(*, fused_loss: bool = False) -> None:
    """Make TRL 1.16's trainers (GRPO, RLOO, DPO, SFT, KTO) use rlhf_fast's fused LM head; idempotent.

    Trainers built afterwards give their models :func:`add_fused_lm_head` (this module's adapter) instead of
    TRL's own; per-token log-probs, entropies and TRL's diagnostics come from :mod:`rlhf_fast.ops`. With
    ``fused_loss=True``, ``GRPOTrainer`` also computes its policy loss with :func:`rlhf_fast.ops.linear_ppo_loss`
    where that matches TRL exactly (module doc), else runs TRL's own loss for the step (with a warning). Calling
    again with another ``fused_loss`` switches it. Undo with :func:`restore`, or use :func:`rlhf_fast_trl`.

    Raises:
        TypeError: ``fused_loss`` is not a bool. ImportError: trl is missing or not 1.16.x (the version found is named).
    """
    if not isinstance(fused_loss, bool):
        raise TypeError(f"fused_loss: expected a bool, got {fused_loss!r}")
    _check_trl()
    import importlib

    for name in TRAINER_MODULES:
        importlib.import_module(name)
    from trl.trainer.grpo_trainer import GRPOTrainer

    _capture_trl()
    _rebind(_State.trl_add_fused_lm_head, add_fused_lm_head)
    if _State.trl_compute_loss is None:
        _State.trl_compute_loss = GRPOTrainer.__dict__["_compute_loss"]
    GRPOTrainer._compute_loss = _grpo_compute_loss if fused_loss else _State.trl_compute_loss
    _State.active, _State.fused_loss = True, fused_loss


def restore() -> None:
    """Undo :func:`use_rlhf_fast`: TRL's own ``add_fused_lm_head`` and ``GRPOTrainer._compute_loss`` are back.

    Models already patched keep rlhf_fast's head (and trainers built on them its fused loss hook, unused once the
    loss is TRL's again). A no-op when not active.
    """
    if not _State.active:
        return
    from trl.trainer.grpo_trainer import GRPOTrainer

    _rebind(add_fused_lm_head, _State.trl_add_fused_lm_head)
    GRPOTrainer._compute_loss = _State.trl_compute_loss
    _State.active = _State.fused_loss = False


@contextlib.contextmanager
def rlhf_fast_trl(*, fused_loss: bool = False):
    """``with rlhf_fast_trl(fused_loss=...):`` :func:`use_rlhf_fast` inside, the previous state back on exit."""
    before = (_State.active, _State.fused_loss)
    use_rlhf_fast(fused_loss=fused_loss)
    try:
        yield
    finally:
        if before[0]:
            use_rlhf_fast(fused_loss=before[1])
        else:
            restore()

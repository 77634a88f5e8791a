"""Fused RLHF ops that never materialize full-vocabulary logits.

Usable on their own with torch (+ triton): nothing here imports the trainer's dependencies.
``reference`` holds the naive full-logits versions, the definition each backend is tested against.

Rules of the fused ops (linear_logprobs, linear_kl, linear_ppo_loss, linear_fisher_product):

- Precision: hidden, weight and bias (and linear_kl's reference side) may each be float32, bfloat16 or
  float16, independently (a bf16 trunk with an fp32 LM head). They compute and accumulate in fp32 whatever
  the inputs and whatever the ambient ``torch.autocast``; outputs are float32 (nats); each gradient comes
  back in its own input's dtype.
- torch.compile: linear_logprobs, linear_kl and linear_ppo_loss's single pass are ``torch.library`` custom
  ops (``rlhf_fast::*``, with fake implementations and registered autograd): no graph break.
- Host syncs: shape / dtype / device checks are static. Value checks (labels in range, 0/1 masks) follow
  ``check_inputs``: None (default) checks eagerly (ValueError) on CPU outside torch.compile and asserts on
  the device (``torch._assert_async``, no sync) otherwise; True always eagerly; False never. Skipping
  ignored rows happens only where counting them is free (CPU, outside torch.compile).
"""
from . import reference
from ._backend import available_backends
from .advantages import outcome_advantages, reinforce_pp_advantages
from .fisher import linear_fisher_product
from .gae import gae
from .kl import kl_penalty, linear_kl
from .logprobs import linear_logprobs
from .masked import masked_mean, masked_whiten
from .ppo import linear_ppo_loss, ppo_policy_loss, ppo_value_loss

__all__ = [
    "available_backends",
    "gae",
    "kl_penalty",
    "linear_fisher_product",
    "linear_kl",
    "linear_logprobs",
    "linear_ppo_loss",
    "masked_mean",
    "masked_whiten",
    "outcome_advantages",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reference",
    "reinforce_pp_advantages",
]

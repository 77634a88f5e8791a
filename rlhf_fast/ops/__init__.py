"""Fused RLHF ops that never materialize full-vocabulary logits.

Usable on their own with torch (+ triton): nothing here imports the trainer's dependencies.
``reference`` holds the naive full-logits versions, the definition each backend is tested against.
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

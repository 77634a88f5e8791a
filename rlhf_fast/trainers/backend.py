"""The single switch between the fused ops and the naive PyTorch path (``kernels: fused | eager``).

"fused" computes log-probs, entropies, KLs and the PPO policy loss straight from hidden states with
``rlhf_fast.ops`` (no [tokens x vocab] logits kept) and GAE with the compiled scan; "eager" is what a plain
PyTorch trainer does: materialize the fp32 logits (``rlhf_fast.ops.reference``) and loop over time for GAE.
The losses of both are the same functions of the same log-probs, so they agree up to float rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops
from ..ops import reference


def aggregate(x: Tensor, mask: Tensor, loss_agg: str, loss_norm_length: int | None = None) -> Tensor:
    """Mean of per-token ``x`` [B, T] as ``loss_agg`` says (the same weighting as the PPO losses)."""
    mask = mask.bool()
    if loss_agg == "token-mean":
        return ops.masked_mean(x, mask)
    if loss_agg == "seq-mean-token-sum-norm":  # Dr.GRPO: a constant B x L, whatever the valid counts
        length = mask.shape[-1] if loss_norm_length is None else loss_norm_length
        return torch.where(mask, x, 0).sum() / max(math.prod(mask.shape[:-1]) * length, 1)
    rows = mask.any(-1)
    per_row = ops.masked_mean(x, mask, dim=-1) if loss_agg == "seq-mean-token-mean" else torch.where(mask, x, 0).sum(-1)
    return ops.masked_mean(per_row, rows)


@dataclass(frozen=True)
class Backend:
    name: str  # "fused" | "eager"

    @property
    def fused(self) -> bool:
        return self.name == "fused"

    def logprobs(self, hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float, return_entropy: bool = False, *,
                 logit_scale: float = 1.0, softcap: float | None = None):
        """[B, T] float32 log-probs of ``labels`` (and entropies) under softmax(f(hidden @ weight.T) / temperature),
        f the model's logit transform (``logit_scale``, ``softcap``: ``integrations.hf.lm_head_params``)."""
        tf = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap)
        if self.fused:
            return ops.linear_logprobs(hidden, weight, labels, return_entropy=return_entropy, **tf)
        return reference.linear_logprobs(hidden.float(), weight.float(), labels, return_entropy=return_entropy, **tf)

    def kl(self, hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor, labels: Tensor, temperature: float, *,
           logit_scale: float = 1.0, softcap: float | None = None) -> Tensor:
        """[B, T] exact KL(pi || pi_ref); one logit transform for both heads (the reference is the policy's class)."""
        tf = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap)
        if self.fused:
            return ops.linear_kl(hidden, weight, ref_hidden, ref_weight, labels, **tf)
        return reference.linear_kl(hidden.float(), weight.float(), ref_hidden.float(), ref_weight.float(), labels, **tf)

    def kl_penalty(self, logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
        if self.fused:
            return ops.kl_penalty(logprobs, ref_logprobs, estimator)
        return reference.kl_penalty(logprobs, ref_logprobs, estimator)

    def gae(self, rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float):
        if self.fused:
            return ops.gae(rewards, values, response_mask, gamma=gamma, lam=lam)
        return reference.gae(rewards, values, response_mask.bool(), gamma, lam)

    def policy_loss(self, hidden: Tensor, weight: Tensor, labels: Tensor, old_logprobs: Tensor, advantages: Tensor,
                    response_mask: Tensor, *, clip_eps: float, clip_eps_high: float | None, dual_clip: float | None,
                    entropy_coef: float, temperature: float, loss_agg: str, policy_loss: str = "ppo_clip",
                    importance_ratio: str = "token", sapo_tau_pos: float = 1.0, sapo_tau_neg: float = 1.05,
                    loss_norm_length: int | None = None, ref_logprobs: Tensor | None = None, kl_coef: float = 0.0,
                    kl_estimator: str = "k3", kl_log_ratio_clip: float | None = 20.0, logit_scale: float = 1.0,
                    softcap: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Policy surrogate (+ in-loss KL when kl_coef > 0) minus the entropy bonus; stats hold clipfrac, approx_kl,
        entropy and per-token logprobs. Both paths take every keyword of ``ops.ppo_policy_loss`` and the model's logit
        transform (``logit_scale``, ``softcap``), so they agree."""
        mask = response_mask.bool()
        kw = dict(clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip, loss_agg=loss_agg,
                  policy_loss=policy_loss, importance_ratio=importance_ratio, sapo_tau_pos=sapo_tau_pos,
                  sapo_tau_neg=sapo_tau_neg, loss_norm_length=loss_norm_length, ref_logprobs=ref_logprobs,
                  kl_coef=kl_coef, kl_estimator=kl_estimator, kl_log_ratio_clip=kl_log_ratio_clip)
        if self.fused:
            return ops.linear_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask, entropy_coef=entropy_coef,
                                       temperature=temperature, logit_scale=logit_scale, softcap=softcap, **kw)
        logprobs, entropy = reference.linear_logprobs(hidden.float(), weight.float(), labels, temperature=temperature, return_entropy=True,
                                                      logit_scale=logit_scale, softcap=softcap)
        loss, stats = ops.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, **kw)
        mean_entropy = aggregate(entropy, mask, loss_agg, loss_norm_length)
        if entropy_coef:
            loss = loss - entropy_coef * mean_entropy
        stats = dict(stats, entropy=ops.masked_mean(entropy.detach(), mask), logprobs=logprobs.detach(), entropies=entropy.detach())
        return loss, stats


def get_backend(name: str) -> Backend:
    if name not in ("fused", "eager"):
        raise ValueError(f"kernels: expected 'fused' or 'eager', got {name!r}")
    return Backend(name)

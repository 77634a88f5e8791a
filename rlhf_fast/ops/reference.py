"""Naive reference implementations: full logits, Python loops.

They define what every fused backend must compute. Tests run them on float64 copies of the inputs; the
trainer's ``kernels: eager`` mode and the benchmarks' "naive" rows run them as they are, in the inputs'
dtype, the way a plain PyTorch RLHF trainer would. No input checks: call the public ops for those.

-inf logits (a bias of -inf forbidding tokens) follow the convention 0 log 0 = 0: a token with p = 0 adds nothing to
an entropy or a KL; KL(p || q) = +inf where some p > 0 meets q = 0 (a constant: no gradient); a label whose logit is
-inf has log-prob -inf, with d logp/dz = onehot - p. A row whose logits are all -inf holds no distribution: log-probs
-inf (d logp/dz = onehot), entropy 0, KL from it 0. Without any -inf logit the plain formulas run unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor


def linear_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None = None, temperature: float = 1.0,
                  logit_scale: float = 1.0, softcap: float | None = None) -> Tensor:
    """[..., H] x [V, H] -> materialized logits [..., V] (dtype of the inputs):
    softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap) / temperature, as the models in transformers
    apply them (the scale on the lm_head output, then Gemma's final_logit_softcapping, then the sampling temperature)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits / temperature


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
):
    """log_softmax(linear_logits(...))[labels], 0 where ignored; optionally the entropy (nats)."""
    logp, has_neginf = _log_softmax(linear_logits(hidden, weight, bias, temperature, logit_scale, softcap))
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logprobs = torch.where(valid, logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0)  # not * valid: -inf * 0 = NaN
    if not return_entropy:
        return logprobs
    entropy = torch.where(valid, -(logp.exp() * (_finite(logp) if has_neginf else logp)).sum(-1), 0)
    return logprobs, entropy


def _log_softmax(z: Tensor) -> tuple[Tensor, bool]:
    """(log_softmax(z) over the last dim, whether any logit is -inf).

    A row of all -inf logits gets -inf log-probs (not NaN) through lse = +inf, a constant: d logp/dz = onehot there.
    """
    neginf = torch.isneginf(z)
    dead = neginf.all(-1, keepdim=True)
    if not bool(dead.any()):
        return torch.log_softmax(z, dim=-1), bool(neginf.any())
    lse = torch.logsumexp(z.masked_fill(dead, 0.0), dim=-1, keepdim=True).masked_fill(dead, float("inf"))
    return z - lse, True


def _finite(logp: Tensor) -> Tensor:
    """logp with 0 for -inf (p = 0): p * that is 0 = 0 log 0, and no inf reaches a gradient (0 * inf = NaN)."""
    return logp.masked_fill(torch.isneginf(logp), 0.0)


def linear_kl(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """Exact KL(pi || pi_ref) per token over the full vocabulary (nats), 0 where labels == ignore_index.

    One logit transform (temperature, logit_scale, softcap) for both heads."""
    logp, neginf = _log_softmax(linear_logits(hidden, weight, bias, temperature, logit_scale, softcap))
    ref_logp, ref_neginf = _log_softmax(linear_logits(ref_hidden, ref_weight, ref_bias, temperature, logit_scale, softcap))
    p = logp.exp()
    if neginf or ref_neginf:
        # 0 log 0 = 0: nothing from p = 0; p > 0 where q = 0 makes KL +inf, a constant (no gradient)
        kl = (p * (logp - _finite(ref_logp)).masked_fill(p == 0, 0.0)).sum(-1)
        kl = kl.masked_fill(((p > 0) & torch.isneginf(ref_logp)).any(-1), float("inf"))
    else:
        kl = (p * (logp - ref_logp)).sum(-1)
    if labels is not None:
        kl = torch.where(labels != ignore_index, kl, 0)
    return kl


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Schulman (2020) per-token KL estimators with log r = ref_logprobs - logprobs."""
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    if estimator == "abs":
        return log_r.abs()
    raise ValueError(f"estimator: expected one of k1, k2, k3, abs, got {estimator!r}")


def gae(rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float = 1.0, lam: float = 0.95):
    """GAE (Schulman et al. 2016) as a Python loop over time steps, vectorized over rows (the common trainer code).

    Masked positions are skipped: the carry (next value, next advantage) passes through them unchanged.
    """
    mask = response_mask.to(torch.bool)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv, torch.zeros_like(adv))
        next_adv = torch.where(m, adv, next_adv)
        next_value = torch.where(m, values[:, t], next_value)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def gae_per_row(rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float = 1.0, lam: float = 0.95):
    """The textbook recursion run literally on each row's compacted valid positions, then scattered back.

    Slow and obviously right: the test oracle for every GAE backend (and for :func:`gae` above).
    """
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = response_mask[b].to(torch.bool).nonzero().flatten().tolist()
        next_value, next_adv = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t].item()
            advantages[b, t] = next_adv
    mask = response_mask.to(torch.bool)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns

"""Rollouts: batched sampling with a KV cache, masking after EOS, and the per-token tensors PPO needs.

Layout of a rollout of B prompts: ``input_ids = [left-padded prompt (P) | response (T)]``. Response token t
sits at column P + t and is predicted from the hidden state at column P + t - 1, so
``hidden[:, P-1 : P+T-1]`` scores the response; the value of the state before token t is read there too.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

from .data import Prompt, left_pad

IGNORE_INDEX = -100


@dataclass
class Rollout:
    prompts: list[str]  # last user message of each prompt (for reward functions and logs)
    responses: list[str]  # decoded responses, up to and without EOS
    input_ids: Tensor  # [B, P + T] long
    attention_mask: Tensor  # [B, P + T] long: prompt tokens and response tokens up to EOS
    prompt_len: int  # P
    response_mask: Tensor  # [B, T] bool: tokens up to and including the first EOS
    no_eos: Tensor  # [B] bool: the response hit max_new_tokens without EOS
    group_ids: Tensor | None = None  # [B] int64: responses to the same prompt share an id (generation.n of them)
    # filled by scoring (all [B, T] float32 unless noted)
    logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    values: Tensor | None = None
    kl: Tensor | None = None  # per-token KL(pi || pi_ref) estimate used in the reward
    scores: Tensor | None = None  # [B] sequence scores after clipping / normalisation / EOS penalty
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    trunk_hidden: Tensor | None = None  # [B, P + T, H] output of the policy's frozen bottom layers (models.TrunkSplit)
    extras: dict = field(default_factory=dict)
    messages: list[list[dict]] | None = None  # each prompt's whole chat (system prompt included), for reward models

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_len:]

    @property
    def labels(self) -> Tensor:
        """Response ids with IGNORE_INDEX outside the response mask (the ops' ``labels``)."""
        return torch.where(self.response_mask, self.response_ids, IGNORE_INDEX)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: Tensor) -> "Rollout":
        """The rows ``idx`` (a minibatch); tensors with a batch dim are indexed, lists too."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = v[idx.to(v.device)]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in idx.tolist()]
        return replace(self, **out)


def response_mask(response_ids: Tensor, eos_ids: list[int]) -> Tensor:
    """True up to and including the first EOS of each row (everything when there is none)."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return ~after


@torch.no_grad()
def generate(policy, tokenizer, prompts: list[Prompt], gen_cfg, eos_ids: list[int], device: torch.device,
             autocast, temperature: float | None = None, greedy: bool = False) -> Rollout:
    """Sample one response per prompt with transformers' ``generate`` (KV cache, stops once all rows hit EOS);
    ``greedy``: the argmax response instead (ReMax's baseline)."""
    from transformers import GenerationConfig

    prompt_ids, prompt_mask = left_pad([p.ids for p in prompts], tokenizer.pad_token_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    # Every sampling knob explicit: a model's generation_config.json (e.g. its own top_k) must not leak in,
    # or the sampling distribution would differ from the one the log-probs are computed under.
    config = GenerationConfig(
        do_sample=not greedy, max_new_tokens=gen_cfg.max_new_tokens, temperature=None if greedy else temperature or gen_cfg.temperature,
        top_p=None if greedy else gen_cfg.top_p, top_k=None if greedy else gen_cfg.top_k, min_length=0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        typical_p=1.0, num_beams=1, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )
    was_training = policy.training
    policy.eval()
    with autocast():
        out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    policy.train(was_training)
    P = prompt_ids.shape[1]
    resp = out[:, P:]
    mask = response_mask(resp, eos_ids)
    T = int(mask.sum(-1).max())
    resp, mask = resp[:, :T], mask[:, :T]
    resp = torch.where(mask, resp, tokenizer.pad_token_id)
    has_eos = torch.isin(resp, torch.tensor(eos_ids, device=device)) & mask
    no_eos = ~has_eos.any(-1)
    texts = tokenizer.batch_decode(torch.where(has_eos, tokenizer.pad_token_id, resp).tolist(), skip_special_tokens=True)
    return Rollout(
        prompts=[p.text for p in prompts], responses=texts,
        messages=[p.messages or [dict(role="user", content=p.text)] for p in prompts],
        input_ids=torch.cat([prompt_ids, resp], dim=1), attention_mask=torch.cat([prompt_mask, mask.long()], dim=1),
        prompt_len=P, response_mask=mask, no_eos=no_eos,
    )


def token_rewards(scores: Tensor, kl: Tensor, response_mask: Tensor, kl_coef: float) -> Tensor:
    """r_t = -kl_coef * KL_t on response tokens, plus the sequence score on each row's last response token
    (Ziegler et al. 2019, eq. 2); 0 outside the mask.

    Args: ``scores`` [B] float; ``kl`` [B, T] float (nats); ``response_mask`` [B, T] bool, which may have holes
    (the score goes to the last True position, not to ``mask.sum() - 1``). A row with no True position has no
    token to credit: its rewards are all 0 and its score is dropped (a NaN score there is not passed on).
    Returns: [B, T] rewards, dtype of ``kl``. Raises: ValueError for mismatched shapes or a non-bool mask.
    """
    if response_mask.dtype != torch.bool or response_mask.dim() != 2 or kl.shape != response_mask.shape:
        raise ValueError(f"response_mask: expected a [B, T] bool tensor of kl's shape {tuple(kl.shape)}, "
                         f"got {response_mask.dtype} {tuple(response_mask.shape)}")
    if scores.shape != response_mask.shape[:1]:
        raise ValueError(f"scores: expected shape ({response_mask.shape[0]},), got {tuple(scores.shape)}")
    rewards = torch.where(response_mask, -kl_coef * kl, 0.0)
    if response_mask.shape[1] == 0:
        return rewards
    positions = torch.arange(response_mask.shape[1], device=response_mask.device)
    last = torch.where(response_mask, positions, -1).amax(-1)  # -1: no response token in the row
    has_token = last >= 0
    rows = torch.arange(len(scores), device=rewards.device)[has_token]
    rewards[rows, last[has_token]] += scores.to(rewards)[has_token]
    return rewards


class RunningMoments:
    """Running mean / std of scalar scores (Chan et al. parallel update), for ``reward.normalize``."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        b_mean, b_var = x.double().mean().item(), x.double().var(unbiased=False).item()
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self) -> float:
        return max(self.var, 1e-12) ** 0.5

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, s: dict) -> None:
        self.mean, self.var, self.count = float(s["mean"]), float(s["var"]), int(s["count"])

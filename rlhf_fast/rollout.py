"""Rollouts: batched sampling with a KV cache, masking after EOS, and the per-token tensors PPO needs.

Layout of a rollout of B prompts: ``input_ids = [padded prompt (P) | response (T)]``, every prompt ending at column
P - 1; its padding sits after the prompts' common prefix (a chat template's system prompt), which is then encoded
once for the batch (``common_prefix``), or at the left. Positions count attended tokens only. Response token t
sits at column P + t and is predicted from the hidden state at column P + t - 1, so
``hidden[:, P-1 : P+T-1]`` scores the response; the value of the state before token t is read there too.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from functools import partial

import torch
from torch import Tensor, nn

from .data import Prompt, left_pad
from .models import position_ids

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
    prefix_len: int = 0  # the first columns hold the same tokens in every row, all attended (pad_after_prefix)
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
    last_hidden: Tensor | None = None  # [B, P + T, H] the policy's last hidden states (final norm) while sampling
    sampled_logprobs: Tensor | None = None  # [B, T] float32: each drawn token's log-prob under the sampler (0 outside the mask)
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


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix all ``seqs`` share, less one where it would reach a sequence's end (the last prompt
    token must be fed with the batch: its hidden state predicts the first response token)."""
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        n = next((i for i, (a, b) in enumerate(zip(first[:n], s[:n])) if a != b), n)
    return max(n, 0)


def group_size(seqs: list[list[int]]) -> int:
    """g when ``seqs`` come in consecutive runs of g > 1 identical sequences (``generation.n`` samples per prompt), else 1."""
    g = next((i for i, s in enumerate(seqs) if s != seqs[0]), len(seqs))
    if g < 2 or len(seqs) % g or any(seqs[i] != seqs[i - i % g] for i in range(len(seqs))):
        return 1
    return g


def pad_after_prefix(seqs: list[list[int]], pad_id: int, prefix: int) -> tuple[Tensor, Tensor]:
    """[B, P] ids and attention mask: the shared ``prefix`` columns, then each row's padding, then its rest
    (right-aligned, so every answer starts at column P); ``prefix`` 0 is plain left padding."""
    ids, mask = left_pad([s[prefix:] for s in seqs], pad_id)
    head = torch.tensor(seqs[0][:prefix], dtype=torch.long).expand(len(seqs), prefix)
    return torch.cat([head, ids], dim=1), torch.cat([torch.ones_like(head), mask], dim=1)


@contextmanager
def recording(module: nn.Module | None):
    """A forward hook that collects ``module``'s outputs over a ``generate`` call: the prefill's [B, P, H], then one
    [B, 1, H] per decode step. Yields the list of detached outputs, in call order."""
    seen = []
    handle = None if module is None else module.register_forward_hook(
        lambda _m, _in, out: seen.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        yield seen
    finally:
        if handle is not None:
            handle.remove()


def _packed_forward(m: nn.Linear, packed: Tensor, x: Tensor) -> Tensor:
    if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or x.dtype != torch.float32:
        return nn.Linear.forward(m, x)  # oneDNN's op has no autograd formula; autocast wants its own dtype
    return torch.ops.mkldnn._linear_pointwise(x, packed, m.bias, "none", [], "")


@contextmanager
def packed_linears(model: nn.Module, rows: int):
    """While open, every fp32 CPU ``nn.Linear`` of ``model`` multiplies by a copy of its weight reordered once into
    oneDNN's blocked layout, instead of MKL's sgemm repacking the weight on each call, which dominates at a decode
    step's few rows (``benchmarks/bench_generate.py``, variant ``dynamic+inversion+packed``). For inference: a call
    with grad enabled, under autocast or on non-fp32 input takes the module's own forward.

    ``rows``: the expected rows per call (a layout hint; any count works). Outputs equal ``F.linear``'s to fp32
    rounding (another summation order). The copies (one per distinct weight) are made on entry and freed on exit:
    the weights change between rollouts. Modules on another device or dtype, sharded ones (DTensor, FSDP2) and
    builds without oneDNN are left alone. Not thread-safe (forwards are swapped on the modules).
    """
    mkldnn = torch.ops.mkldnn
    patched, copies = [], {}
    usable = torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
    if usable and not torch.is_autocast_enabled("cpu"):  # under autocast every call would take its own forward: no copies
        for m in model.modules():
            w = m.weight if type(m) is nn.Linear else None
            if w is not None and w.device.type == "cpu" and w.dtype == torch.float32 and type(w.data) is Tensor:
                if id(w) not in copies:  # tied weights are copied once
                    copies[id(w)] = mkldnn._reorder_linear_weight(w.detach(), rows)
                m.forward = partial(_packed_forward, m, copies[id(w)])  # an instance attribute shadows the class's
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def sample_by_inversion(scores: Tensor, temperature: float, return_logprobs: bool = False):
    """Next tokens drawn from softmax(scores / temperature) by inversion: one uniform per row against the row's
    cumulative distribution (float64), so a token of probability 0 (a -inf score) is never drawn.

    The same distribution as ``torch.multinomial``, which on the CPU draws an exponential variate per vocabulary entry:
    24.6 ms per decode step at 16 x 49152 on the development CPU, against 2-4 ms for this (``benchmarks/bench_generate.py``).
    Uses the global torch RNG.

    Args: scores [B, V] float logits (a row needs one finite entry); temperature > 0.
    Returns: [B] int64 token ids, scores' device; with ``return_logprobs`` also their [B] float32 log-probs (nats)
    under softmax(scores / temperature), from the same scaled scores.
    Raises: ValueError naming the argument: scores not [B, V] floats, a row with no finite score or a NaN (the
    distribution is undefined), temperature not > 0.
    """
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores: expected a [B, V] float tensor, got {scores.dtype} {tuple(scores.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
    x = scores.float() / temperature
    cdf = torch.softmax(x, dim=-1).double().cumsum(-1)
    if not bool(torch.isfinite(cdf[:, -1]).all()):  # generate syncs every step anyway (its stopping check)
        raise ValueError("scores: a row has no finite score, or a NaN: its softmax is undefined")
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    if not return_logprobs:
        return token
    return token, x.gather(1, token.unsqueeze(1)).squeeze(1) - x.logsumexp(-1)


class _InversionSampler:
    """A logits processor for transformers' greedy search that samples: every score but the drawn token's becomes -inf
    (``sample_by_inversion``), which the argmax then picks. Keeps each step's [B] log-probs of the drawn tokens
    under softmax(scores / temperature) in ``logprobs``."""

    def __init__(self, temperature: float):
        self.temperature, self.logprobs = temperature, []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        token, logprobs = sample_by_inversion(scores, self.temperature, return_logprobs=True)
        self.logprobs.append(logprobs)
        return torch.full_like(scores, float("-inf")).scatter_(1, token.unsqueeze(1), 0.0)


@torch.no_grad()
def generate(policy, tokenizer, prompts: list[Prompt], gen_cfg, eos_ids: list[int], device: torch.device,
             autocast, temperature: float | None = None, greedy: bool = False, keep_trunk: nn.Module | None = None,
             keep_last: nn.Module | None = None, share_prefix: bool = True, synced: bool = False, packed: bool = False) -> Rollout:
    """Sample one response per prompt with transformers' ``generate`` (KV cache, stops once all rows hit EOS; the
    untruncated distribution drawn by ``sample_by_inversion``); ``greedy``: the argmax response instead (ReMax's baseline).

    ``share_prefix``: prompt tokens that several rows share run once and their KV cache is repeated: with runs of g
    identical prompts (``group_size``, GRPO's samples), each prompt once; else the common prefix (``common_prefix``,
    a chat template's system prompt) once. The distribution sampled is the same, up to float rounding.
    ``synced``: every rank of a sharded (FSDP2) policy keeps running forwards until all ranks are done.
    ``packed``: the policy's fp32 CPU linear layers run on oneDNN-packed weight copies (``packed_linears``): the
    same distribution to fp32 rounding, a faster decode on the CPU; ignored elsewhere.

    ``keep_trunk``: a module inside the policy (the last layer of its frozen bottom, ``models.TrunkSplit.boundary``)
    whose outputs, which sampling computes anyway, become ``trunk_hidden`` [B, P + T, H], so scoring need not run the
    bottom again. The KV-cached decode computes them a column at a time rather than in one causal pass: they equal
    the full forward's up to float rounding. The last response token is never fed back, so the last column is zeros:
    it feeds no other position (causal attention) and no score reads its output.
    ``keep_last``: likewise for the policy's final norm, whose outputs become ``last_hidden``: the policy's hidden
    states for scoring (log-probs, values) at the weights that sampled, without another forward. Sampling also
    returns each drawn token's log-prob (``sampled_logprobs``, unless ``greedy``), from the scores it drew from.
    """
    from transformers import GenerationConfig

    if gen_cfg.top_k or gen_cfg.top_p < 1:  # the log-probs are the full softmax's: a truncated sampler is off-policy
        raise ValueError(f"gen_cfg: top_k={gen_cfg.top_k}, top_p={gen_cfg.top_p}: only the full softmax is sampled")
    seqs = [p.ids for p in prompts]
    prefix = common_prefix(seqs) if share_prefix and len(seqs) > 1 else 0
    prompt_ids, prompt_mask = pad_after_prefix(seqs, tokenizer.pad_token_id, prefix)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    # What is encoded once: with runs of g identical prompts (generation.n), every column but the last of one row per
    # run, its KV cache then repeated g times; else the common prefix of one row, repeated for the batch.
    g = group_size(seqs) if share_prefix else 1
    rows, width, repeat = (slice(None, None, g), prompt_ids.shape[1] - 1, g) if g > 1 else (slice(0, 1), prefix, len(seqs))
    # Every sampling knob explicit: a model's generation_config.json (e.g. its own top_k) must not leak in, or the
    # sampling distribution would differ from the one the log-probs are computed under. Greedy search, whose logits
    # processor draws the token from the full softmax (by inversion) unless ``greedy``.
    from transformers import LogitsProcessorList

    config = GenerationConfig(
        do_sample=False, max_new_tokens=gen_cfg.max_new_tokens, temperature=None, top_p=None, top_k=None, min_length=0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, typical_p=1.0, num_beams=1, eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )
    sampler = None if greedy else _InversionSampler(temperature or gen_cfg.temperature)
    processors = LogitsProcessorList([] if sampler is None else [sampler])
    was_training = policy.training
    policy.eval()
    with autocast(), recording(keep_trunk) as seen, recording(keep_last) as seen_last, \
            (packed_linears(policy, len(seqs)) if packed else nullcontext()):
        cache = {}
        if width:  # transformers' generate feeds only the columns past the cache's length
            m = prompt_mask[rows, :width]  # positions count attended tokens, as generate counts them (padding may precede)
            head = policy(input_ids=prompt_ids[rows, :width], attention_mask=m, position_ids=position_ids(m), use_cache=True, logits_to_keep=1)
            name = "cache" if "cache" in head else "past_key_values"  # renamed in transformers 5.2x
            head[name].batch_repeat_interleave(repeat)
            cache[name] = head[name]
            for kept in (seen, seen_last):
                if kept:
                    kept[0] = kept[0].repeat_interleave(repeat, dim=0)
        out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config, synced_gpus=synced,
                              logits_processor=processors, **cache)
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
        trunk_hidden=_columns(seen, P + T), last_hidden=_columns(seen_last, P + T),
        sampled_logprobs=None if sampler is None else torch.where(mask, torch.stack(sampler.logprobs, 1)[:, :T], 0.0),
        prompts=[p.text for p in prompts], responses=texts,
        messages=[p.messages or [dict(role="user", content=p.text)] for p in prompts],
        input_ids=torch.cat([prompt_ids, resp], dim=1), attention_mask=torch.cat([prompt_mask, mask.long()], dim=1),
        prompt_len=P, prefix_len=prefix, response_mask=mask, no_eos=no_eos,
    )


def _columns(seen: list[Tensor], n: int) -> Tensor | None:
    """[B, n, H] from a recording's outputs: columns 0 .. n-2 as recorded, the last (never fed back) zeros."""
    if not seen:
        return None
    h = torch.cat(seen, dim=1)[:, :n - 1]
    return torch.cat([h, h.new_zeros(h.shape[0], 1, h.shape[2])], dim=1)


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

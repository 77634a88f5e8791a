"""Sequence rewards from text: VADER sentiment, any ``module:function``, or a reward model; weighted sums of them.

Every reward takes ``(prompts: list[str], responses: list[str]) -> list[float]``, where ``prompts[i]`` is the
last user message of prompt i (``rlhf_fast.data.Prompt.text``). A reward that also declares a parameter named
``messages`` receives, as ``messages=``, each prompt's whole chat (``list[list[dict]]`` of ``{role, content}``,
the system prompt and earlier turns included). ``RewardModel`` is one: it scores the whole conversation, rendered
and tokenized by the same function ``rlhf-fast rm`` trains on (``rlhf_fast.trainers.rm.render``), with its own
tokenizer (and chat template), so its vocabulary never has to match the policy's.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Callable

import torch

from .errors import UserError

RewardFn = Callable[[list[str], list[str]], list[float]]
Messages = list[dict]  # chat messages, {role, content} each


def takes_messages(fn) -> bool:
    """Whether the reward ``fn`` declares a ``messages`` parameter (and so is passed each prompt's chat)."""
    try:
        param = inspect.signature(fn).parameters.get("messages")
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


class VaderSentiment:
    """VADER compound sentiment of the response (Hutto & Gilbert 2014), in [-1, 1]; the prompt is ignored."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.analyzer.polarity_scores(r)["compound"] for r in responses]


class RewardModel:
    """A 1-label ``AutoModelForSequenceClassification``: the score of the conversation (the prompt's messages, then
    the response as the assistant turn), rendered and tokenized exactly as ``rlhf-fast rm`` trained it
    (``rlhf_fast.trainers.rm.render``, the tokenizer's chat template when it has one) and read at the last non-pad
    token. Longer renderings are cut to ``max_length`` tokens."""

    def __init__(self, path: str, device: torch.device, batch_size: int = 16, max_length: int = 1024):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(f"reward model {path!r}: cannot read its config: {e}") from None
        if getattr(config, "num_labels", 1) != 1:
            raise UserError(f"reward model {path!r} has {config.num_labels} labels; a reward model has exactly 1")
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(device).eval()
        except ValueError as e:
            raise UserError(f"reward model {path!r} is not an AutoModelForSequenceClassification: {str(e).splitlines()[0]}") from None
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # the classifier pools at the last non-pad token
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.path = path

    def encode(self, messages: Messages, response: str) -> list[int]:
        """Token ids of ``messages`` + the assistant ``response``: the rm trainer's rendering (one code path). The
        saved tokenizer carries the chat template only when the model was trained with one."""
        from .trainers.rm import render

        return render(self.tokenizer, messages, response)[: self.max_length]

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], messages: list[Messages] | None = None) -> list[float]:
        """[len(responses)] scores. ``messages``: each prompt's chat (system prompt and earlier turns included);
        None scores each ``prompts[i]`` as a single user message."""
        if messages is None:
            messages = [[dict(role="user", content=p)] for p in prompts]
        if len(messages) != len(responses):
            raise ValueError(f"messages: expected {len(responses)} conversations (one per response), got {len(messages)}")
        pad = self.tokenizer.pad_token_id
        out = []
        for s in range(0, len(responses), self.batch_size):
            seqs = [self.encode(m, r) for m, r in zip(messages[s:s + self.batch_size], responses[s:s + self.batch_size])]
            width = max(map(len, seqs))
            ids = torch.tensor([x + [pad] * (width - len(x)) for x in seqs], dtype=torch.long, device=self.device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], dtype=torch.long, device=self.device)
            out += self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
        return out


def load_function(spec: str) -> RewardFn:
    module_name, _, fn_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"reward {spec!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"reward {spec!r}: module {module_name!r} has no function {fn_name!r}")
    return fn


def load_reward(spec: str, device: torch.device, batch_size: int = 16) -> RewardFn:
    """``"vader"``, ``"module:function"`` or a reward-model folder; anything else raises UserError."""
    if spec.lower() == "vader":
        return VaderSentiment()
    if Path(spec).expanduser().is_dir():
        return RewardModel(str(Path(spec).expanduser()), device, batch_size)
    if spec.count(":") == 1 and all(part.strip() for part in spec.split(":")) and "/" not in spec:
        return load_function(spec)
    raise UserError(f"reward spec {spec!r}: expected 'vader', 'module:function', or an existing reward-model folder")


class CombinedReward:
    """sum_i weight_i * reward_i(prompts, responses); also returns each term for logging (multi-objective).
    Rewards that declare a ``messages`` parameter (reward models among them) also get each prompt's chat."""

    def __init__(self, sources, device: torch.device, batch_size: int = 16):
        self.names, self.weights, self.fns = [], [], []
        for src in sources:
            self.names.append(_short_name(src.spec))
            self.weights.append(float(src.weight))
            self.fns.append(load_reward(src.spec, device, batch_size))
        self.wants_messages = [takes_messages(fn) for fn in self.fns]

    @property
    def reward_model_path(self) -> str | None:
        return next((fn.path for fn in self.fns if isinstance(fn, RewardModel)), None)

    def __call__(self, prompts: list[str], responses: list[str], messages: list[Messages] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total [B] float32, {name: [B] float32 per term}); non-finite values pass through for the caller to catch.

        ``prompts``: the last user message of each prompt; ``messages``: each prompt's whole chat (None: rewards
        that take it see ``prompts[i]`` as a single user message)."""
        if messages is not None and len(messages) != len(responses):
            raise ValueError(f"messages: expected {len(responses)} conversations (one per response), got {len(messages)}")
        total = torch.zeros(len(responses), dtype=torch.float32)
        terms = {}
        for name, w, fn, wants in zip(self.names, self.weights, self.fns, self.wants_messages):
            if wants:
                chats = messages if messages is not None else [[dict(role="user", content=p)] for p in prompts]
                values = fn(prompts, responses, messages=chats)
            else:
                values = fn(prompts, responses)
            if len(values) != len(responses):
                raise UserError(f"reward {name!r} returned {len(values)} values for {len(responses)} responses")
            try:
                t = torch.tensor([float(v) for v in values], dtype=torch.float32)
            except (TypeError, ValueError):
                raise UserError(f"reward {name!r} must return a list of numbers, got {values[:3]!r}...") from None
            terms[name] = t
            total += w * t
        return total, terms


def _short_name(spec: str) -> str:
    if spec.lower() == "vader":
        return "vader"
    return Path(spec).name if "/" in spec else spec.replace(":", ".")

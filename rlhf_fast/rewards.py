"""Sequence rewards from text: VADER sentiment, any ``module:function``, or a reward model; weighted sums of them.

Every reward takes ``(prompts: list[str], responses: list[str]) -> list[float]``. A reward model re-tokenizes
the text with its own tokenizer (and chat template), so its vocabulary never has to match the policy's.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import torch

from .errors import UserError

RewardFn = Callable[[list[str], list[str]], list[float]]


class VaderSentiment:
    """VADER compound sentiment of the response (Hutto & Gilbert 2014), in [-1, 1]; the prompt is ignored."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.analyzer.polarity_scores(r)["compound"] for r in responses]


class RewardModel:
    """A 1-label ``AutoModelForSequenceClassification``: the score of (prompt, response) rendered as a chat."""

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

    def text(self, prompt: str, response: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            msgs = [dict(role="user", content=prompt), dict(role="assistant", content=response)]
            return self.tokenizer.apply_chat_template(msgs, tokenize=False)
        return prompt + "\n\n" + response

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for s in range(0, len(prompts), self.batch_size):
            texts = [self.text(p, r) for p, r in zip(prompts[s:s + self.batch_size], responses[s:s + self.batch_size])]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                                 add_special_tokens=not getattr(self.tokenizer, "chat_template", None)).to(self.device)
            out += self.model(**enc).logits[:, 0].float().tolist()
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
    """sum_i weight_i * reward_i(prompts, responses); also returns each term for logging (multi-objective)."""

    def __init__(self, sources, device: torch.device, batch_size: int = 16):
        self.names, self.weights, self.fns = [], [], []
        for src in sources:
            self.names.append(_short_name(src.spec))
            self.weights.append(float(src.weight))
            self.fns.append(load_reward(src.spec, device, batch_size))

    @property
    def reward_model_path(self) -> str | None:
        return next((fn.path for fn in self.fns if isinstance(fn, RewardModel)), None)

    def __call__(self, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total [B] float32, {name: [B] float32 per term}); non-finite values pass through for the caller to catch."""
        total = torch.zeros(len(responses), dtype=torch.float32)
        terms = {}
        for name, w, fn in zip(self.names, self.weights, self.fns):
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

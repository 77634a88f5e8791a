"""Prompt files: JSONL or Parquet rows with a ``prompt`` string or chat ``messages``, a train/eval split,
the tokenizer's chat template, and a resumable sampler.

The policy sees the templated tokens (``Prompt.ids``); reward functions see the last user message (``Prompt.text``),
and reward models the whole chat (``Prompt.messages``, system prompt included) plus the response.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .errors import UserError

EVAL_SPLITS = ("eval", "test", "validation", "valid")


@dataclass
class Prompt:
    text: str  # the last user message, as the reward function receives it
    ids: list[int]  # token ids after the chat template, ending where the assistant's answer begins
    messages: list[dict] = field(default_factory=list)  # the whole chat before the answer (system prompt included)


@dataclass
class PromptSet:
    train: list[Prompt]
    eval: list[Prompt]


def builtin_path(name: str) -> Path:
    path = Path(str(resources.files("rlhf_fast") / "assets" / f"{name}.jsonl"))
    if not path.is_file():
        raise UserError(f"data.prompt_file: no built-in prompt file {name!r} (have: everyday_prompts)")
    return path


def read_rows(path_spec: str) -> list[dict]:
    """Rows of a JSONL (.jsonl/.json, one object per line) or Parquet file; ``builtin:NAME`` for shipped files."""
    path = builtin_path(path_spec.split(":", 1)[1]) if path_spec.startswith("builtin:") else Path(path_spec).expanduser()
    if not path.is_file():
        raise UserError(f"data.prompt_file: {str(path)!r} not found")
    if path.suffix == ".parquet":
        from datasets import Dataset

        return Dataset.from_parquet(str(path)).to_list()
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"data.prompt_file: {str(path)!r} line {n} is not JSON ({e.msg}); expected JSONL") from None
            if not isinstance(row, dict):
                raise UserError(f"data.prompt_file: {str(path)!r} line {n}: expected a JSON object per line")
            rows.append(row)
    return rows


def _messages(row: dict, n: int, system_prompt: str | None) -> list[dict]:
    if "messages" in row and row["messages"]:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise UserError(f"data.prompt_file row {n}: 'messages' must be a list of {{role, content}} objects")
        msgs = [dict(role=m["role"], content=m["content"]) for m in msgs]
        if msgs[-1]["role"] == "assistant":  # a full conversation: prompt with everything before the last answer
            msgs = msgs[:-1]
    elif isinstance(row.get("prompt"), str):
        msgs = [dict(role="user", content=row["prompt"])]
    else:
        raise UserError(f"data.prompt_file row {n}: needs a 'prompt' string or a chat 'messages' list, got keys {sorted(row)}")
    if not msgs or not any(m["content"].strip() for m in msgs):
        raise UserError(f"data.prompt_file row {n}: empty prompt")
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [dict(role="system", content=system_prompt)] + msgs
    return msgs


def encode(msgs: list[dict], tokenizer, use_template: bool) -> list[int]:
    if use_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    text = "\n\n".join(m["content"] for m in msgs)
    return tokenizer(text, add_special_tokens=True).input_ids


def load_prompts(data_cfg, tokenizer, max_new_tokens: int, context_length: int | None) -> PromptSet:
    """Tokenized train/eval prompts. Raises UserError for an empty file, missing columns, prompts longer than
    ``data.max_prompt_length`` (unless dropped), or prompt + response lengths beyond the model's context."""
    if context_length is not None and data_cfg.max_prompt_length + max_new_tokens > context_length:
        raise UserError(f"data.max_prompt_length ({data_cfg.max_prompt_length}) + generation.max_new_tokens ({max_new_tokens}) "
                        f"exceeds the model's context of {context_length} tokens")
    rows = read_rows(data_cfg.prompt_file)
    if not rows:
        raise UserError(f"data.prompt_file: {data_cfg.prompt_file!r} holds no prompts")
    prompts, is_eval, too_long = [], [], []
    for n, row in enumerate(rows, 1):
        msgs = _messages(row, n, data_cfg.system_prompt)
        ids = encode(msgs, tokenizer, data_cfg.chat_template)
        if len(ids) > data_cfg.max_prompt_length:
            too_long.append((n, len(ids)))
            continue
        user = [m["content"] for m in msgs if m["role"] == "user"]
        prompts.append(Prompt(text=user[-1] if user else msgs[-1]["content"], ids=ids, messages=msgs))
        is_eval.append(str(row.get(data_cfg.split_column, "")).lower() in EVAL_SPLITS)
    if too_long and not data_cfg.drop_long_prompts:
        n, length = too_long[0]
        raise UserError(f"data.prompt_file: {len(too_long)} prompt(s) longer than data.max_prompt_length={data_cfg.max_prompt_length} "
                        f"tokens (first: row {n}, {length} tokens); raise the limit or set data.drop_long_prompts=true")
    if not prompts:
        raise UserError("data.prompt_file: no prompt fits data.max_prompt_length")
    if any(is_eval):
        train = [p for p, e in zip(prompts, is_eval) if not e]
        evals = [p for p, e in zip(prompts, is_eval) if e]
    else:  # no split column: a fixed random fraction is held out
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0)).tolist()
        n_eval = int(len(prompts) * data_cfg.eval_fraction)
        evals = [prompts[i] for i in sorted(order[:n_eval])]
        train = [prompts[i] for i in sorted(order[n_eval:])]
    if not train:
        raise UserError("data.prompt_file: the train split is empty")
    return PromptSet(train=train, eval=evals)


class PromptSampler:
    """Batches of prompt indices, reshuffled every epoch from (seed, epoch): the state is two ints."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0

    def _order(self) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch)).tolist()

    def next_batch(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            order = self._order()
            take = order[self.pos: self.pos + self.batch_size - len(out)]
            out += take
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] ids right-aligned (left padding, so every answer starts at column P) and their attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask

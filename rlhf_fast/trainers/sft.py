"""Supervised fine-tuning: next-token negative log-likelihood of the response tokens only.

The loss is -mean over response tokens of log pi(y_t | x, y_<t), with the log-probs from
``rlhf_fast.ops.linear_logprobs`` on the backbone's hidden states and the LM-head weight, so no
[tokens x vocab] logits tensor is ever kept. Prompt tokens (everything but the assistant's answers) carry
IGNORE_INDEX. With ``data.packing`` short examples share rows of ``data.max_length`` tokens; the position ids
restart at each example, which makes transformers mask attention across examples (block-diagonal causal).

``SFTTrainer(load_stage_config(SFTConfig, "configs/sft_smollm2.yaml")).train()``; ``rlhf-fast sft --config ...``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import distributed
from ..config import ModelConfig, RunConfig
from ..integrations.hf import lm_head_params
from ..models import backbone, maybe_compile
from ..preference_data import load_examples, with_system_prompt
from .backend import get_backend
from .stage import (IGNORE_INDEX, StageDataConfig, StageTrainer, TrainConfig, batch_tensors, encode_conversation, load_policy,
                    report_data, right_pad, token_logprobs, validate_common)


@dataclass
class SFTDataConfig(StageDataConfig):
    packing: bool = False  # pack short examples into rows of data.max_length tokens (train.batch_size then counts rows)


@dataclass
class SFTConfig(RunConfig):
    output_dir: str = "runs/sft"
    kernels: str = "fused"  # fused: rlhf_fast.ops.linear_logprobs; eager: full logits (rlhf_fast.ops.reference)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-5))

    def validate(self) -> "SFTConfig":
        validate_common(self)
        return self


@dataclass
class Tokens:
    ids: list[int]
    labels: list[int]  # ids on trained tokens, IGNORE_INDEX elsewhere
    positions: list[int] | None = None  # packed rows: restarts at every example

    @property
    def n_labels(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)  # the first token is never predicted


def pack(examples: list[Tokens], max_length: int) -> list[Tokens]:
    """First-fit-decreasing packing into rows of at most ``max_length`` tokens; each example keeps its own positions
    0..n-1 and its first token is not a target (it would be predicted from the previous example)."""
    rows: list[list[Tokens]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e.ids)):
        slot = next((i for i, r in enumerate(room) if r >= len(ex.ids)), None)
        if slot is None:
            rows.append([])
            room.append(max_length)
            slot = len(rows) - 1
        rows[slot].append(ex)
        room[slot] -= len(ex.ids)
    out = []
    for row in rows:
        ids, labels, pos = [], [], []
        for ex in row:
            ids += ex.ids
            labels += [IGNORE_INDEX] + ex.labels[1:]
            pos += list(range(len(ex.ids)))
        out.append(Tokens(ids, labels, pos))
    return out


class SFTTrainer(StageTrainer):
    name = "sft"
    config_class = SFTConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.backend = get_backend(cfg.kernels)
        self.tokenizer, self.model = load_policy(cfg.model, self.device, self.bf16)
        self.body = maybe_compile(backbone(self.model), cfg.model.compile, self.device)
        self.modules = {"policy": self.model}
        loaded = load_examples(cfg.data, "sft", cfg.seed)
        d = cfg.data
        use_template = d.chat_template

        def encode(conversations):
            out, long = [], 0
            for c in conversations:
                ids, labels = encode_conversation(with_system_prompt(c.messages, d.system_prompt), self.tokenizer, use_template)
                if len(ids) > d.max_length:
                    long += 1
                elif any(x != IGNORE_INDEX for x in labels[1:]):
                    out.append(Tokens(ids, labels))
            return out, long

        train, long_train = encode(loaded.train)
        self.eval_set, long_eval = encode(loaded.eval)
        self.data_stats = report_data("sft", loaded, len(train), len(self.eval_set), long_train + long_eval, d.max_length)
        self.train_set = pack(train, d.max_length) if d.packing else train
        if d.packing:
            self.data_stats["data/packed_rows"] = float(len(self.train_set))

    def micro_counts(self, micros: list[list[Tokens]]) -> list[float]:
        """Response tokens: the step's loss is the mean over all of its response tokens (on every rank together)."""
        return [float(sum(e.n_labels for e in m)) for m in micros]

    def token_logprobs(self, examples: list[Tokens]) -> tuple[Tensor, Tensor]:
        """([B, S-1] log-probs of the targets, [B, S-1] target mask)."""
        pad = self.tokenizer.pad_token_id
        head = lm_head_params(self.model)  # read now: a LoRA head is folded with its graph
        if examples[0].positions is not None:  # packed rows: attention from the position restarts, no 2D mask
            ids = right_pad([e.ids for e in examples], pad).to(self.device)
            labels = right_pad([e.labels for e in examples], IGNORE_INDEX).to(self.device)
            pos = right_pad([e.positions for e in examples], -1)
            tail = pos < 0  # padding forms its own segment: positions 0.. again
            pos = torch.where(tail, tail.long().cumsum(-1) - 1, pos).to(self.device)
            lp = token_logprobs(self.body, head, ids, None, labels, self.backend, self.autocast, self.fp32, position_ids=pos,
                                 head_dtype=self.head_dtype)
        else:
            ids, mask, labels = batch_tensors([e.ids for e in examples], [e.labels for e in examples], pad, self.device)
            lp = token_logprobs(self.body, head, ids, mask, labels, self.backend, self.autocast, self.fp32,
                                head_dtype=self.head_dtype)
        return lp, labels[:, 1:] != IGNORE_INDEX

    def compute_loss(self, examples: list[Tokens]) -> tuple[Tensor, dict[str, float]]:
        lp, target = self.token_logprobs(examples)
        n = target.sum().clamp(min=1)
        loss = -lp.sum() / n
        return loss, {"loss": loss.detach(), "tokens": n.detach().float()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_set:
            return {}
        self.set_train(False)
        total, n = 0.0, 0
        bs = self.cfg.train.eval_batch_size
        for s in range(0, len(self.eval_set), bs):  # every rank the whole set: FSDP's forwards are collective
            lp, target = distributed.in_root(self.model, self.token_logprobs, self.eval_set[s:s + bs])
            total += float(-lp.sum())
            n += int(target.sum())
        loss = total / max(n, 1)
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}

    def save_final_model(self):
        return self.save_model_folder(self.model, self.tokenizer, self.cfg.model.lora.enabled)


"""What the supervised stages (reward model, SFT, DPO) share: config, tokens, and their unit of the one loop.

A stage's config is a dataclass tree like the PPO trainer's, loaded the same way (``config.load_structured``:
YAML, then ``--section.key=value`` overrides, unknown keys rejected with the valid ones listed). A YAML section
only overrides the keys it names, so a stage whose nested defaults differ from the PPO defaults (the pipeline's
embedded PPO config) keeps them.

The loop is the RL trainer's (``trainers.loop``); a stage's unit is one optimizer step on ``train.batch_size``
examples (gradient accumulation over ``train.micro_batch_size``), AdamW with a ``transformers`` LR schedule,
evaluation before / every ``train.eval_every`` steps / after training.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import distributed
from ..config import LR_SCHEDULES, load_structured, resume_config_path
from ..data import PromptSampler
from ..errors import UserError
from ..preference_data import Messages
from .loop import Loop, build_optimizer, resolve_device, seed_everything  # noqa: F401 (re-exported)

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    epochs: float = 1.0  # passes over the train split (fractional allowed)
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 16  # examples per optimizer step
    micro_batch_size: int = 4  # examples per forward/backward (gradient accumulation up to batch_size)
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    lr_schedule: str = "cosine"  # constant | constant_with_warmup | linear | cosine (transformers.get_scheduler)
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    eval_every: int = 0  # steps between evaluations (0: before and after training only)
    eval_batch_size: int = 16


@dataclass
class StageDataConfig:
    train_file: str = ""  # JSONL / Parquet / a datasets.save_to_disk folder
    eval_file: str | None = None  # None: a saved DatasetDict's test split, else rows with split_column=eval, else eval_fraction
    split_column: str = "split"
    eval_fraction: float = 0.1
    skip_invalid: bool = False  # drop (and count) invalid rows instead of stopping at the first
    max_length: int = 512  # prompt + response tokens; longer examples are dropped and counted
    chat_template: bool = True  # render with the tokenizer's chat template when it has one
    system_prompt: str | None = None


def choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")


def validate_common(cfg) -> None:
    """Checks every stage config shares (top-level run keys, ``train``, ``data`` and ``model`` sections)."""
    t, d, m = cfg.train, cfg.data, cfg.model
    choice("model.bf16", m.bf16, ("auto", "true", "false"))
    choice("model.attn_implementation", m.attn_implementation, ("auto", "sdpa", "eager", "flash_attention_2"))
    if hasattr(m, "compile"):
        choice("model.compile", m.compile, ("auto", "true", "false"))
    if hasattr(cfg, "kernels"):
        choice("kernels", cfg.kernels, ("fused", "eager"))
    for key, value in [("train.batch_size", t.batch_size), ("train.micro_batch_size", t.micro_batch_size),
                       ("train.eval_batch_size", t.eval_batch_size), ("data.max_length", d.max_length),
                       ("save_every", cfg.save_every)]:
        if value < 1:
            raise UserError(f"{key}: must be >= 1, got {value}")
    if t.batch_size % t.micro_batch_size:
        raise UserError(f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size ({t.micro_batch_size})")
    if t.max_steps is not None and t.max_steps < 1:
        raise UserError(f"train.max_steps: must be >= 1 or null, got {t.max_steps}")
    if t.epochs <= 0 or t.lr <= 0 or t.weight_decay < 0 or t.max_grad_norm <= 0:
        raise UserError("train.epochs, train.lr and train.max_grad_norm must be > 0, train.weight_decay >= 0")
    if t.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"train.lr_schedule: expected one of {', '.join(LR_SCHEDULES)}, got {t.lr_schedule!r}")
    if len(t.adam_betas) != 2:
        raise UserError(f"train.adam_betas: expected two numbers, got {t.adam_betas}")
    if not 0 <= d.eval_fraction < 1:
        raise UserError(f"data.eval_fraction: must be in [0, 1), got {d.eval_fraction}")


def load_stage_config(cls, path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None):
    """The validated ``cls()`` with the YAML file's keys and then the overrides applied (each key checked)."""
    return load_structured(cls, path, overrides).validate()


# ----------------------------------------------------------------------------------------------- tokens


def _render(tokenizer, msgs: Messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt) if msgs else ""


def encode_conversation(msgs: Messages, tokenizer, use_template: bool, last_only: bool = False) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a conversation with labels = ids on the assistant messages' tokens (their end-of-turn
    token included) and IGNORE_INDEX elsewhere; ``last_only`` trains on the last assistant message only.

    With a chat template, the text is cut where each assistant answer starts and ends (the template rendered up to
    it, with and without the answer) and each piece is tokenized on its own, so a prompt encodes exactly as the
    PPO trainer encodes it (``rlhf_fast.data.encode``). Without one, a single answer follows the prompt's
    text directly (as in generation) and ends with EOS. Raises UserError when neither applies.
    """
    assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if last_only:
        assistant = assistant[-1:]
    if not (use_template and getattr(tokenizer, "chat_template", None)):
        if len(assistant) != 1 or assistant[0] != len(msgs) - 1 or any(m["role"] == "assistant" for m in msgs[:-1]):
            raise UserError("a multi-turn conversation needs a tokenizer with a chat template (data.chat_template=true)")
        prompt = tokenizer("\n\n".join(m["content"] for m in msgs[:-1]), add_special_tokens=True).input_ids
        answer = tokenizer(msgs[-1]["content"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
    ids, labels, done = [], [], ""
    for i in assistant:
        start, end = _render(tokenizer, msgs[:i], True), _render(tokenizer, msgs[: i + 1], False)
        if not start.startswith(done) or not end.startswith(start):
            raise UserError("the tokenizer's chat template does not render conversations incrementally (an earlier turn "
                            "renders differently once later turns exist); use data.chat_template=false")
        before = tokenizer(start[len(done):], add_special_tokens=False).input_ids
        answer = tokenizer(end[len(start):], add_special_tokens=False).input_ids
        ids += before + answer
        labels += [IGNORE_INDEX] * len(before) + answer
        done = end
    return ids, labels


def token_logprobs(body, head, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor, backend,
                   autocast, fp32, position_ids: Tensor | None = None, head_dtype: torch.dtype = torch.float32) -> Tensor:
    """[B, S-1] float32 log-probs of ``labels[:, 1:]`` (0 where IGNORE_INDEX) from the backbone's hidden states and the
    LM head (``integrations.hf.LMHead``: weight [V, H] and the model's logit scale / softcap) through
    ``backend.logprobs`` (``rlhf_fast.ops.linear_logprobs`` when fused: no [tokens x vocab] logits).
    ``position_ids`` with ``attention_mask=None`` runs packed rows (each restart of the positions begins a sequence
    the others cannot attend to, transformers' packed-sequence masking)."""
    from ..models import hidden_states

    with autocast():
        if position_ids is not None:
            h = body(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        else:
            h = hidden_states(body, input_ids, attention_mask)
    with fp32():
        # head_dtype bf16 under bf16 (the fused ops accumulate in fp32): fp32 operands would take the GPU's
        # exact-fp32 dot path, many times slower than its bf16 tensor cores
        return backend.logprobs(h[:, :-1].to(head_dtype), head.weight.to(head_dtype), labels[:, 1:], 1.0,
                                logit_scale=head.logit_scale, softcap=head.softcap)


def right_pad(seqs: list[list[int]], value: int) -> Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def batch_tensors(ids: list[list[int]], labels: list[list[int]] | None, pad_id: int, device) -> tuple[Tensor, Tensor, Tensor | None]:
    """Right-padded (input_ids, attention_mask, labels) on ``device``."""
    input_ids = right_pad(ids, pad_id)
    mask = right_pad([[1] * len(s) for s in ids], 0)
    lab = right_pad(labels, IGNORE_INDEX).to(device) if labels is not None else None
    return input_ids.to(device), mask.to(device), lab


# ----------------------------------------------------------------------------------------------- the loop


class StageTrainer(Loop):
    """Subclasses set ``name`` and implement ``setup`` (models, ``train_set``, ``eval_set``, ``modules``),
    ``compute_loss(examples) -> (loss, stats)``, ``evaluate() -> metrics`` and ``save_final_model() -> Path``.
    A unit of the loop (``trainers.loop``) is one optimizer step on ``train.batch_size`` examples."""

    name = "stage"
    unit = "step"
    config_class: type = None

    def __init__(self, config, resume: str | Path | None = None):
        self.cfg = cfg = config.validate()
        self.run_dir = Path(resume) if resume is not None else Path(cfg.output_dir)
        self.world, self.device = distributed.setup(resolve_device(cfg.device), cfg.dist_timeout_s)
        t = cfg.train
        if t.batch_size % (self.world.size * t.micro_batch_size):
            raise UserError(f"train.batch_size ({t.batch_size}) must be a multiple of the world size x train.micro_batch_size "
                            f"({self.world.size} x {t.micro_batch_size}): every rank takes an equal share of each step")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.data_stats: dict[str, float] = {}
        self.setup()
        self.root = next(iter(self.modules.values()))  # compute_loss runs as its forward (``distributed.in_root``)
        if self.world.active:  # FSDP2: each decoder layer a unit, then each model
            from ..models import backbone, unwrap

            for m in self.modules.values():
                distributed.shard(m, backbone(unwrap(m)).layers, mesh=self.world.mesh, bf16_params=self.bf16,
                                  cpu_offload=cfg.fsdp_cpu_offload)
        self.params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        if not self.params:
            raise UserError(f"{self.name}: nothing to train (every parameter is frozen)")
        total = t.max_steps or max(1, math.ceil(t.epochs * len(self.train_set) / t.batch_size))
        self.optimizer, self.scheduler = build_optimizer(
            [{"params": self.params}], lr=t.lr, adam_betas=t.adam_betas, adam_eps=t.adam_eps, weight_decay=t.weight_decay,
            lr_schedule=t.lr_schedule, warmup_steps=t.warmup_steps, total_steps=total)
        self.sampler = PromptSampler(len(self.train_set), t.batch_size, cfg.seed)
        self.start(total, t.eval_every, resume)

    @classmethod
    def from_cli(cls, config_path: str | None, overrides: list[str], resume: str | None):
        """The CLI's constructor: a resumed run reads its own config.yaml (overrides still apply)."""
        return cls(load_stage_config(cls.config_class, resume_config_path(config_path, resume), overrides), resume=resume)

    @property
    def step(self) -> int:
        """Optimizer steps done (the loop's unit counter)."""
        return self.iteration

    # -------------------------------------------------------------------------------------- hooks

    def setup(self) -> None:
        raise NotImplementedError

    def compute_loss(self, examples: list) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def initial_metrics(self) -> dict[str, float]:
        return self.data_stats | self.evaluate()

    def postfix(self, metrics: dict) -> dict[str, str]:
        return {"loss": f"{metrics.get('loss', float('nan')):.4f}"}

    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        return self.modules

    def micro_counts(self, micros: list[list]) -> list[float]:
        """What each micro-batch's loss is a mean over (its examples by default); the step's loss is the mean over all."""
        return [float(len(m)) for m in micros]

    # -------------------------------------------------------------------------------------- helpers

    @property
    def bf16(self) -> bool:
        from ..models import bf16_enabled

        return bf16_enabled(getattr(getattr(self.cfg, "model", None), "bf16", "false"), self.device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    @property
    def head_dtype(self) -> torch.dtype:
        """Dtype of the LM-head operands (hidden states, weight) given to the log-prob op."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def fp32(self):
        """Head math (log-probs, rewards) in fp32 even under bf16 autocast."""
        return torch.autocast(self.device.type, enabled=False) if self.bf16 else nullcontext()

    def set_train(self, mode: bool) -> None:
        for m in self.modules.values():
            m.train(mode)

    # -------------------------------------------------------------------------------------- a unit

    def run_unit(self, stop) -> dict[str, float]:
        examples = [self.train_set[i] for i in self.sampler.next_batch()]  # the same global batch on every rank
        t, world = self.cfg.train, self.world
        share = len(examples) // world.size
        mine = examples[world.rank * share:(world.rank + 1) * share]
        micros = [mine[s:s + t.micro_batch_size] for s in range(0, len(mine), t.micro_batch_size)]
        weights = world.shares(self.micro_counts(micros))  # over the global batch
        self.set_train(True)
        sums, w, grad_norm = self.optimizer_step(
            [(w, lambda m=m: distributed.in_root(self.root, self.compute_loss, m)) for m, w in zip(micros, weights)], self.params,
            t.max_grad_norm)
        self.set_train(False)
        return world.mean_metrics(sums, w) | {"grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
                                              "skipped_steps": self.skipped_steps}


def report_data(name: str, loaded, n_train: int, n_eval: int, dropped_long: int, max_length: int) -> dict[str, float]:
    """Print and return what loading kept and dropped (invalid rows under skip_invalid, over-long examples)."""
    if loaded.skipped:
        print(f"{name}: skipped {loaded.skipped} invalid row(s) (first: {loaded.first_error})", flush=True)
    if dropped_long:
        print(f"{name}: dropped {dropped_long} example(s) longer than data.max_length={max_length} tokens", flush=True)
    if not n_train:
        raise UserError(f"{name}: no training example fits data.max_length={max_length}")
    return {"data/train_examples": float(n_train), "data/eval_examples": float(n_eval),
            "data/skipped_invalid": float(loaded.skipped), "data/dropped_long": float(dropped_long)}


def load_policy(model_cfg, device: torch.device, bf16: bool, no_dropout: bool = False):
    """(tokenizer, causal LM) of ``model.policy`` (``rlhf_fast.config.ModelConfig``: LoRA, gradient checkpointing);
    ``bf16``: whether it runs under bf16 autocast (see ``attn_implementation``); ``no_dropout``: every dropout
    (LoRA's included) set to 0. Raises UserError for an LM head the trainers cannot score (``checked_lm_head``)."""
    from ..models import (add_lora, attn_implementation, checked_lm_head, disable_dropout, enable_gradient_checkpointing, load_causal_lm,
                          load_tokenizer, resolve_model_path)

    path = resolve_model_path(model_cfg.policy, "model.policy")
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, attn_implementation(model_cfg.attn_implementation, device, bf16), device)
    if model_cfg.lora.enabled:
        model = add_lora(model, model_cfg.lora)
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, model_cfg.lora.enabled)
    if no_dropout:
        disable_dropout(model)
    checked_lm_head(model)  # a head the ops cannot reproduce, or with a bias, fails here rather than mid-training
    return tokenizer, model

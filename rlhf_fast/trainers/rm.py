"""Reward models: a Hugging Face backbone plus a linear head read at the last non-pad token.

The model *is* an ``AutoModelForSequenceClassification`` (built from any causal-LM or classifier folder), so the
reward read in training is exactly what plain transformers, and the PPO trainer's reward loader
(``rlhf_fast.rewards.RewardModel``), compute from the saved folder: the text is (prompt, response) rendered with
the tokenizer's chat template, and the score is read at the last token that is not the pad token.

Multi-objective: ``model.heads`` lists named heads with weights (e.g. helpful 1.0, harmless 0.5). The head
is one Linear with a row per objective; a row of data trains the head its ``objective`` field names. Since the
heads are linear in the same features, the weighted reward sum_k w_k (W_k h) = (sum_k w_k W_k) h is itself one
linear head: ``final/`` holds that 1-label model, and ``final/heads.safetensors`` + ``heads.json`` keep the
separate heads for per-objective evaluation.

``model.train_layers``: null trains everything; k trains the top k decoder layers (+ final norm + heads); 0
trains the heads alone, on pooled features computed once (a linear probe: seconds instead of minutes on a CPU).

``rlhf-fast rm --config ...`` trains; ``rlhf-fast rm-eval MODEL DATA`` evaluates a saved folder.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import distributed
from ..config import RunConfig
from ..errors import UserError
from ..models import (attn_implementation, backbone, disable_dropout, enable_gradient_checkpointing, hidden_states, load_tokenizer,
                      resolve_model_path)
from ..preference_data import Messages, Preference, load_examples, parse_preference, read_splits, with_system_prompt
from ..rm_losses import LOSSES, centering_penalty, ranking_loss
from ..rm_metrics import evaluate_rewards, pair_arrays, plot_reliability, preference_accuracy, scalars
from .stage import StageDataConfig, StageTrainer, TrainConfig, choice, report_data, resolve_device, right_pad, validate_common

HEADS_FILE, HEADS_JSON = "heads.safetensors", "heads.json"


@dataclass
class HeadConfig:
    name: str = "reward"
    weight: float = 1.0  # its share of the combined reward


@dataclass
class RMModelConfig:
    backbone: str = "smollm2"  # a causal-LM or sequence-classifier folder, or "smollm2"
    attn_implementation: str = "auto"
    bf16: str = "auto"
    gradient_checkpointing: bool = False
    train_layers: int | None = None  # null: all; k: the top k decoder layers + final norm + heads; 0: heads only
    heads: list[HeadConfig] = field(default_factory=lambda: [HeadConfig()])


@dataclass
class RMLossConfig:
    type: str = "pairwise"  # pairwise (Bradley-Terry, all ordered pairs) | adjacent | plackett_luce
    margin: float = 0.0  # added to each row's own `margin` field (pairwise and adjacent)
    center_coef: float = 0.0  # weight of the reward-centering penalty (mean reward per prompt)^2


@dataclass
class RMConfig(RunConfig):
    output_dir: str = "runs/rm"
    # save_final_model: the 1-label AutoModelForSequenceClassification + tokenizer in output_dir/final
    calibration_bins: int = 10
    model: RMModelConfig = field(default_factory=RMModelConfig)
    data: StageDataConfig = field(default_factory=lambda: StageDataConfig(max_length=1024))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, lr_schedule="linear"))
    loss: RMLossConfig = field(default_factory=RMLossConfig)

    def validate(self) -> "RMConfig":
        validate_common(self)
        choice("loss.type", self.loss.type, LOSSES)
        heads = self.model.heads
        if not heads:
            raise UserError("model.heads: at least one head is needed")
        names = [h.name for h in heads]
        if len(set(names)) != len(names) or not all(n.strip() for n in names):
            raise UserError(f"model.heads: head names must be distinct and non-empty, got {names}")
        if self.model.train_layers is not None and self.model.train_layers < 0:
            raise UserError(f"model.train_layers: must be >= 0 or null, got {self.model.train_layers}")
        if self.loss.margin < 0 or self.loss.center_coef < 0:
            raise UserError("loss.margin and loss.center_coef must be >= 0")
        if self.calibration_bins < 1:
            raise UserError(f"calibration_bins: must be >= 1, got {self.calibration_bins}")
        return self


# ----------------------------------------------------------------------------------------------- model


def render(tokenizer, prompt: Messages, response: str, use_template: bool = True) -> list[int]:
    """Token ids of (prompt, response) as ``rlhf_fast.rewards.RewardModel`` renders them for a single user prompt."""
    if use_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(prompt + [dict(role="assistant", content=response)], tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    text = "\n\n".join(m["content"] for m in prompt) + "\n\n" + response
    return tokenizer(text, add_special_tokens=True).input_ids


def last_token_index(input_ids: Tensor, pad_id: int) -> Tensor:
    """[B] index of the last token that is not ``pad_id``: where transformers' sequence classifiers read the score."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


def pooled_hidden(model, input_ids: Tensor, attention_mask: Tensor, pad_id: int) -> Tensor:
    """[B, H] last hidden state at :func:`last_token_index` (the backbone only; the head is applied by the caller)."""
    h = hidden_states(backbone(model), input_ids, attention_mask)
    return h[torch.arange(h.shape[0], device=h.device), last_token_index(input_ids, pad_id)]


def load_classifier(path: str, num_labels: int, attn: str, device: torch.device, what: str = "model.backbone"):
    """An AutoModelForSequenceClassification with ``num_labels`` outputs from a causal-LM or classifier folder."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{what}: cannot read the model config in {path!r}: {e}") from None
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise UserError(f"{what}: model_type {config.model_type!r} in {path!r} has no AutoModelForSequenceClassification")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32,
                                                               attn_implementation=attn, ignore_mismatched_sizes=True)
    return model.to(device)


def freeze_for(model, train_layers: int | None) -> None:
    """Leave trainable: everything (None), or the heads plus the top ``train_layers`` decoder layers and final norm."""
    if train_layers is None:
        return
    model.requires_grad_(False)
    model.score.requires_grad_(True)
    if train_layers == 0:
        return
    body = backbone(model)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError("model.train_layers: this backbone has no `.layers` list of decoder layers; use null (train all) or 0")
    if train_layers > len(layers):
        raise UserError(f"model.train_layers: {train_layers} > the backbone's {len(layers)} layers")
    for layer in layers[-train_layers:]:
        layer.requires_grad_(True)
    if isinstance(getattr(body, "norm", None), nn.Module):
        body.norm.requires_grad_(True)


def save_reward_model(model, tokenizer, names: list[str], weights: list[float], out: str | Path, use_template: bool = True,
                      world: distributed.World = distributed.World()) -> Path:
    """Write the 1-label classifier whose head is sum_k weights[k] * head_k (plus the separate heads) to ``out``.
    Under FSDP2 every rank calls it: the weights are gathered and rank 0 writes."""
    out = Path(out)
    state = dict(distributed.full_state_dict(model))
    if world.main:
        heads = {k: state[f"score.{k}"].detach().cpu() for k in ("weight", "bias") if f"score.{k}" in state}
        w = torch.tensor(weights, dtype=heads["weight"].dtype)
        state |= {f"score.{k}": (w @ v).reshape(1, *v.shape[1:]) for k, v in heads.items()}  # the combined head
        n_labels = model.config.num_labels
        model.config.num_labels = 1
        model.config.id2label, model.config.label2id = {0: "reward"}, {"reward": 0}
        model.config.pad_token_id = tokenizer.pad_token_id
        try:
            model.save_pretrained(out, state_dict=state)
        finally:
            model.config.num_labels = n_labels
        saved_tok = tokenizer
        if not use_template and getattr(tokenizer, "chat_template", None):  # trained on plain text: scorers must not template
            import copy

            saved_tok = copy.copy(tokenizer)
            saved_tok.chat_template = None
        saved_tok.save_pretrained(out)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in heads.items()}, out / HEADS_FILE)
        (out / HEADS_JSON).write_text(json.dumps({"names": names, "weights": weights}, indent=1))
    if world.active:
        torch.distributed.barrier()
    return out


# ----------------------------------------------------------------------------------------------- examples


@dataclass
class Ranked:
    """A preference row as token ids: responses best first."""

    ids: list[list[int]]
    strict: list[bool]
    ratings: list[float]
    rated: bool  # ratings are given scores on one scale (global rank correlation uses only these)
    margin: float
    head: int
    objective: str | None
    features: Tensor | None = None  # [k, H] pooled hidden states when the backbone is frozen


def encode_preferences(prefs: list[Preference], tokenizer, data_cfg, head_index: dict[str, int], what: str,
                       strict_heads: bool = True) -> tuple[list[Ranked], int]:
    """(encoded rows, number dropped as longer than data.max_length). With ``strict_heads`` a row must name one of
    several heads (UserError otherwise); without, such rows get head -1 (no head of theirs)."""
    out, long = [], 0
    for p in prefs:
        if not strict_heads:
            head = head_index.get(p.objective, 0 if len(head_index) == 1 else -1)
        elif p.objective is None:
            if len(head_index) > 1:
                raise UserError(f"{what} row {p.row}: no 'objective' field, but the model has heads {sorted(head_index)}; "
                                "each row must say which one it labels")
            head = 0
        elif p.objective in head_index:
            head = head_index[p.objective]
        else:
            raise UserError(f"{what} row {p.row}: objective {p.objective!r} is not one of the heads {sorted(head_index)}")
        prompt = with_system_prompt(p.prompt, data_cfg.system_prompt)
        ids = [render(tokenizer, prompt, r, data_cfg.chat_template) for r in p.responses]
        if max(map(len, ids)) > data_cfg.max_length:
            long += 1
            continue
        out.append(Ranked(ids, p.strict, p.ratings, p.rated, p.margin, head, p.objective))
    return out, long


def pad_groups(values: list[Tensor], examples: list[Ranked], device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example reward vectors -> (rewards [B, K] zero-padded, mask [B, K], strict [B, K-1])."""
    K = max(len(e.ids) for e in examples)
    rewards = torch.zeros(len(examples), K, device=device, dtype=values[0].dtype)
    mask = torch.zeros(len(examples), K, dtype=torch.bool, device=device)
    strict = torch.ones(len(examples), K - 1, dtype=torch.bool, device=device)
    for b, (v, e) in enumerate(zip(values, examples)):
        rewards[b, : len(v)] = v
        mask[b, : len(v)] = True
        strict[b, : len(e.strict)] = torch.tensor(e.strict, dtype=torch.bool)
    return rewards, mask, strict


# ----------------------------------------------------------------------------------------------- trainer


class RewardModelTrainer(StageTrainer):
    name = "rm"
    config_class = RMConfig

    def setup(self) -> None:
        cfg, m, d = self.cfg, self.cfg.model, self.cfg.data
        path = resolve_model_path(m.backbone, "model.backbone")
        self.tokenizer = load_tokenizer(path)
        self.pad_id = self.tokenizer.pad_token_id
        self.model = load_classifier(path, len(m.heads), attn_implementation(m.attn_implementation, self.device, self.bf16), self.device)
        self.model.config.pad_token_id = self.pad_id
        disable_dropout(self.model)  # a reward is a deterministic function of the text
        if m.gradient_checkpointing:
            enable_gradient_checkpointing(self.model, lora=False)
        freeze_for(self.model, m.train_layers)
        self.modules = {"model": self.model}
        self.head_names = [h.name for h in m.heads]
        self.head_weights = [float(h.weight) for h in m.heads]
        loaded = load_examples(d, "preference", cfg.seed)
        index = {n: i for i, n in enumerate(self.head_names)}
        self.train_set, long_train = encode_preferences(loaded.train, self.tokenizer, d, index, "data.train_file")
        self.eval_set, long_eval = encode_preferences(loaded.eval, self.tokenizer, d, index, "data.eval_file" if d.eval_file else "data.train_file")
        self.data_stats = report_data("rm", loaded, len(self.train_set), len(self.eval_set), long_train + long_eval, d.max_length)
        self.frozen_backbone = m.train_layers == 0
        if self.frozen_backbone:  # a linear probe: the features never change, so compute them once
            self.model.eval()
            for split in (self.train_set, self.eval_set):
                self._cache_features(split)

    @torch.no_grad()
    def _cache_features(self, examples: list[Ranked]) -> None:
        flat = [(e, i) for e in examples for i in range(len(e.ids))]
        feats = []
        bs = self.cfg.train.eval_batch_size
        for s in range(0, len(flat), bs):
            feats.append(self._pooled([e.ids[i] for e, i in flat[s:s + bs]]).cpu())
        feats = torch.cat(feats) if feats else torch.zeros(0)
        pos = 0
        for e in examples:
            e.features = feats[pos: pos + len(e.ids)].to(self.device)
            pos += len(e.ids)

    def _pooled(self, seqs: list[list[int]]) -> Tensor:
        ids = right_pad(seqs, self.pad_id).to(self.device)
        mask = right_pad([[1] * len(s) for s in seqs], 0).to(self.device)
        with self.autocast():
            h = pooled_hidden(self.model, ids, mask, self.pad_id)
        return h.float()

    def head_scores(self, examples: list[Ranked]) -> list[Tensor]:
        """Per example, [k, n_heads] float32 scores of its responses (best first)."""
        if self.frozen_backbone:
            feats = torch.cat([e.features for e in examples])
        else:
            feats = self._pooled([ids for e in examples for ids in e.ids])
        with self.fp32():
            scores = self.model.score(feats.to(self.model.score.weight.dtype)).float()
        return list(scores.split([len(e.ids) for e in examples]))

    def compute_loss(self, examples: list[Ranked]) -> tuple[Tensor, dict[str, float]]:
        scores = self.head_scores(examples)
        own = [s[:, e.head] for s, e in zip(scores, examples)]
        rewards, mask, strict = pad_groups(own, examples, self.device)
        margin = torch.tensor([e.margin + self.cfg.loss.margin for e in examples], device=self.device)
        loss = ranking_loss(self.cfg.loss.type, rewards, mask, strict, margin)
        stats = {"loss/ranking": loss.detach()}
        if self.cfg.loss.center_coef:
            penalty = centering_penalty(rewards, mask)
            loss = loss + self.cfg.loss.center_coef * penalty
            stats["loss/centering"] = penalty.detach()
        better, worse = pair_arrays([r.detach().cpu().tolist() for r in own], [e.strict for e in examples])
        stats |= {"loss": loss.detach(), "accuracy": preference_accuracy(better, worse),
                  "reward/mean": rewards[mask].detach().mean()}
        return loss, stats

    @torch.no_grad()
    def all_scores(self, examples: list[Ranked]) -> list[np.ndarray]:
        self.set_train(False)
        bs, out = self.cfg.train.eval_batch_size, []
        for s in range(0, len(examples), bs):  # every rank all of them: FSDP's forwards are collective
            out += [x.cpu().numpy() for x in distributed.in_root(self.model, self.head_scores, examples[s:s + bs])]
        return out

    def evaluate(self) -> dict[str, float]:
        if not self.eval_set:
            return {}
        scores = self.all_scores(self.eval_set)
        metrics, bins = metrics_by_head(scores, self.eval_set, self.head_names, self.head_weights, self.cfg.calibration_bins)
        if self.world.main:
            plot_reliability(bins, self.run_dir / "reliability.png", f"reward model calibration (step {self.step})")
            (self.run_dir / "eval_metrics.json").write_text(json.dumps(dict(metrics, step=self.step, calibration_bins=bins), indent=1))
        return {f"eval/{k}": v for k, v in metrics.items()}

    def save_final_model(self) -> Path:
        return save_reward_model(self.model, self.tokenizer, self.head_names, self.head_weights, self.run_dir / "final",
                                 self.cfg.data.chat_template, self.world)


def metrics_by_head(scores: list[np.ndarray], examples: list[Ranked], names: list[str], weights: list[float],
                    n_bins: int = 10) -> tuple[dict[str, float], list[dict]]:
    """Metrics of each row scored by the head it labels ("accuracy", ...; calibration bins returned apart); with
    several heads also per head ("<name>/accuracy", ...) and for the weighted combination ("combined/...")."""
    own = [s[:, e.head] for s, e in zip(scores, examples)]
    full = evaluate_rewards(own, [e.strict for e in examples], [e.ratings for e in examples], n_bins, [e.rated for e in examples])
    bins = full.pop("calibration_bins")
    metrics = scalars(full)
    if len(names) > 1:
        w = np.asarray(weights)
        combined = evaluate_rewards([s @ w for s in scores], [e.strict for e in examples], [e.ratings for e in examples], n_bins,
                                    [e.rated for e in examples])
        metrics |= {f"combined/{k}": v for k, v in scalars(combined).items()}
        for h, name in enumerate(names):
            sel = [i for i, e in enumerate(examples) if e.head == h]
            if sel:
                part = evaluate_rewards([own[i] for i in sel], [examples[i].strict for i in sel], [examples[i].ratings for i in sel],
                                        n_bins, [examples[i].rated for i in sel])
                metrics |= {f"{name}/{k}": v for k, v in scalars(part).items()}
    return metrics, bins


# ----------------------------------------------------------------------------------------------- rm-eval


class RewardScorer:
    """A saved reward-model folder: the combined score (what PPO reads) and, when saved, each head's."""

    def __init__(self, path: str, device: torch.device, max_length: int = 1024):
        from safetensors.torch import load_file

        self.path = resolve_model_path(path, "MODEL")
        self.device, self.max_length = device, max_length
        self.tokenizer = load_tokenizer(self.path)
        self.pad_id = self.tokenizer.pad_token_id
        self.model = load_classifier(self.path, 1, "sdpa", device, "MODEL").eval()
        self.model.config.pad_token_id = self.pad_id
        self.names, self.weights, self.heads = ["reward"], [1.0], self.model.score.weight.detach()
        if (Path(self.path) / HEADS_FILE).is_file():
            meta = json.loads((Path(self.path) / HEADS_JSON).read_text())
            heads = load_file(Path(self.path) / HEADS_FILE)["weight"].to(device)
            if heads.shape[1] == self.heads.shape[1]:
                self.names, self.weights, self.heads = list(meta["names"]), [float(x) for x in meta["weights"]], heads

    @torch.no_grad()
    def scores(self, examples: list[Ranked], batch_size: int = 16) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(combined [k] per example, heads [k, n_heads] per example)."""
        flat = [ids for e in examples for ids in e.ids]
        comb, heads = [], []
        for s in range(0, len(flat), batch_size):
            seqs = flat[s:s + batch_size]
            ids = right_pad(seqs, self.pad_id).to(self.device)
            mask = right_pad([[1] * len(x) for x in seqs], 0).to(self.device)
            h = pooled_hidden(self.model, ids, mask, self.pad_id).float()
            comb.append(self.model.score(h)[:, 0].cpu())
            heads.append((h @ self.heads.T.float()).cpu())
        comb, heads = torch.cat(comb).numpy(), torch.cat(heads).numpy()
        sizes = np.cumsum([0] + [len(e.ids) for e in examples])
        return ([comb[a:b] for a, b in zip(sizes, sizes[1:])], [heads[a:b] for a, b in zip(sizes, sizes[1:])])


def evaluate_folder(model: str, data: str, out: str | Path | None = None, *, split: str | None = None, batch_size: int = 16,
                    max_length: int = 1024, bins: int = 10, skip_invalid: bool = False, device: str = "auto") -> dict:
    """Every reward-model metric of a saved folder on a preference file (the combined reward on all rows; with
    saved heads, each head on the rows whose ``objective`` names it). Writes metrics.json and reliability.png
    to ``out`` when given; returns the scalar metrics."""
    scorer = RewardScorer(model, resolve_device(device), max_length)
    splits = read_splits(data, "DATA")
    name = split or next((s for s in ("test", "validation", "eval", "valid") if s in splits), "train")
    if name not in splits:
        raise UserError(f"--split: DATA has no split {name!r} (has {sorted(splits)})")
    prefs, errors = [], []
    for n, row in splits[name]:
        try:
            prefs.append(parse_preference(row, "DATA", n))
        except UserError as e:
            if not skip_invalid:
                raise
            errors.append(str(e))
    index = {n: i for i, n in enumerate(scorer.names)}
    data_cfg = StageDataConfig(max_length=max_length)  # the saved tokenizer's template (if any) is how it was trained
    examples, long = encode_preferences(prefs, scorer.tokenizer, data_cfg, index, "DATA", strict_heads=False)
    if not examples:
        raise UserError("DATA: no rows to evaluate")
    comb, heads = scorer.scores(examples, batch_size)
    full = evaluate_rewards(comb, [e.strict for e in examples], [e.ratings for e in examples], bins, [e.rated for e in examples])
    cal = full.pop("calibration_bins")
    metrics = scalars(full)
    if len(scorer.names) > 1:
        for h, hname in enumerate(scorer.names):
            sel = [i for i, e in enumerate(examples) if e.head == h]
            if sel:
                part = evaluate_rewards([heads[i][:, h] for i in sel], [examples[i].strict for i in sel],
                                        [examples[i].ratings for i in sel], bins, [examples[i].rated for i in sel])
                metrics |= {f"{hname}/{k}": v for k, v in scalars(part).items()}
    metrics |= {"rows": len(examples), "skipped_invalid": len(errors), "dropped_long": long}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        record = dict(metrics, calibration_bins=cal, model=str(model), data=str(data), split=name)
        (out / "metrics.json").write_text(json.dumps(record, indent=1))
        plot_reliability(cal, out / "reliability.png", f"{Path(model).name} on {Path(data).name}")
    return metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="reward-model folder (a 1-label AutoModelForSequenceClassification, e.g. RUN_DIR/final)")
    p.add_argument("data", help="preference data: JSONL / Parquet / a datasets.save_to_disk folder")
    p.add_argument("--split", help="split of a saved DatasetDict (default: test or validation when present, else train)")
    p.add_argument("--out", default="rm_eval", help="folder for metrics.json and reliability.png (default ./rm_eval)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024, help="longer (prompt + response) examples are dropped and counted")
    p.add_argument("--bins", type=int, default=10, help="calibration bins over confidence [0.5, 1]")
    p.add_argument("--skip-invalid", action="store_true", help="drop and count invalid rows instead of stopping")
    p.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.bins < 1 or args.max_length < 1:
        raise UserError("--batch-size, --bins and --max-length must be >= 1")
    metrics = evaluate_folder(args.model, args.data, args.out, split=args.split, batch_size=args.batch_size,
                              max_length=args.max_length, bins=args.bins, skip_invalid=args.skip_invalid, device=args.device)
    print(json.dumps(metrics, indent=1))
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'reliability.png'}")
    return 0

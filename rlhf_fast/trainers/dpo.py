"""Direct Preference Optimization (Rafailov et al. 2023) and its IPO variant (Azar et al. 2023).

For a prompt x with a chosen response y_w and a rejected y_l, the sequence log-probs log pi(y|x) (sums over
the response tokens, from ``rlhf_fast.ops.linear_logprobs``: no [tokens x vocab] logits) give
h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)] and the loss

    sigmoid (DPO, Rafailov et al. 2023 eq. 7):  -log sigmoid(beta * h)
    ipo     (IPO, Azar et al. 2023 eq. 17):      (h - 1 / (2 beta))^2

The reference log-probs are computed once, before training, with the initial policy (or
``dpo.reference_model``), and cached in ``RUN_DIR/reference_logprobs.pt`` under a key of the token ids and a
content hash of the reference's weight files (new weights at the same path are recomputed, not served stale):
no reference model is kept in memory while training. Logged: the implicit rewards beta * (log pi - log pi_ref)
of chosen and rejected, their accuracy (chosen > rejected) and margin.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed
from ..config import ModelConfig, RunConfig
from ..errors import UserError
from ..integrations.hf import lm_head_params
from ..models import backbone, checked_lm_head, maybe_compile
from ..preference_data import load_examples, with_system_prompt
from .backend import get_backend
from .stage import (StageDataConfig, StageTrainer, TrainConfig, batch_tensors, choice, encode_conversation, load_policy,
                    report_data, token_logprobs, validate_common)

LOSS_TYPES = ("sigmoid", "ipo")
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # what from_pretrained loads weights from


def weights_digest(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    """sha256 (hex) of a model folder's ``config.json`` and weight files (``WEIGHT_SUFFIXES``, top level, sorted
    by name; each file's name, size and bytes, read in ``chunk_bytes`` chunks): it changes whenever the weights
    or the architecture do. Reads every weight byte once (about a second per GB). Raises UserError when the folder
    holds no weight file."""
    folder = Path(path)
    files = sorted(f for f in folder.iterdir() if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name == "config.json"))
    if not any(f.suffix in WEIGHT_SUFFIXES for f in files):
        raise UserError(f"{str(folder)!r}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) to key the reference log-prob cache on")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
        with open(f, "rb") as stream:
            while chunk := stream.read(chunk_bytes):
                h.update(chunk)
    return h.hexdigest()


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             beta: float, loss_type: str = "sigmoid") -> tuple[Tensor, Tensor, Tensor]:
    """DPO / IPO loss of a batch of preference pairs.

    Args: four [B] float tensors of sequence log-probs (nats, summed over response tokens); ``beta`` > 0;
    ``loss_type`` "sigmoid" (Rafailov et al. 2023, eq. 7) or "ipo" (Azar et al. 2023, eq. 17).
    Returns: (mean loss 0-d, chosen rewards [B], rejected rewards [B]) with reward = beta * (logp - ref_logp), detached.
    Raises: ValueError for a bad beta, loss_type or mismatched shapes.
    """
    if beta <= 0:
        raise ValueError(f"beta: must be > 0, got {beta}")
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or policy_chosen_logps.dim() != 1:
        raise ValueError(f"log-probs: expected four [B] tensors of one shape, got {sorted(map(tuple, shapes))}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type: expected one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


@dataclass
class DPOSection:
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo
    reference_model: str | None = None  # None: the initial policy (the usual choice: the SFT model being tuned)


@dataclass
class DPOConfig(RunConfig):
    output_dir: str = "runs/dpo"
    kernels: str = "fused"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: StageDataConfig = field(default_factory=StageDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-7, lr_schedule="linear"))
    dpo: DPOSection = field(default_factory=DPOSection)

    def validate(self) -> "DPOConfig":
        validate_common(self)
        choice("dpo.loss_type", self.dpo.loss_type, LOSS_TYPES)
        if self.dpo.beta <= 0:
            raise UserError(f"dpo.beta: must be > 0, got {self.dpo.beta}")
        return self


@dataclass
class Pair:
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    ref_chosen: float = float("nan")  # reference sequence log-probs, filled before training
    ref_rejected: float = float("nan")


class DPOTrainer(StageTrainer):
    name = "dpo"
    config_class = DPOConfig

    def setup(self) -> None:
        cfg, d = self.cfg, self.cfg.data
        self.backend = get_backend(cfg.kernels)
        self.tokenizer, self.model = load_policy(cfg.model, self.device, self.bf16, no_dropout=True)
        self.body = maybe_compile(backbone(self.model), cfg.model.compile, self.device)
        self.modules = {"policy": self.model}
        loaded = load_examples(d, "preference", cfg.seed)

        def encode(prefs):
            out, long = [], 0
            for p in prefs:
                if len(p.responses) != 2:
                    raise UserError(f"dpo: data row {p.row} ranks {len(p.responses)} responses; DPO takes pairwise rows "
                                    "(prompt, chosen, rejected)")
                prompt = with_system_prompt(p.prompt, d.system_prompt)
                c, r = (encode_conversation(prompt + [dict(role="assistant", content=resp)], self.tokenizer, d.chat_template,
                                            last_only=True) for resp in p.responses)
                if max(len(c[0]), len(r[0])) > d.max_length:
                    long += 1
                else:
                    out.append(Pair(c[0], c[1], r[0], r[1]))
            return out, long

        self.train_set, long_train = encode(loaded.train)
        self.eval_set, long_eval = encode(loaded.eval)
        self.data_stats = report_data("dpo", loaded, len(self.train_set), len(self.eval_set), long_train + long_eval, d.max_length)
        self._reference_logprobs()

    # -------------------------------------------------------------------------------------- log-probs

    def sequence_logprobs(self, pairs: list[Pair], body=None, head=None) -> tuple[Tensor, Tensor]:
        """(chosen [B], rejected [B]) summed response log-probs; chosen and rejected run as one batch. ``body`` and
        ``head`` (an ``integrations.hf.LMHead``) default to the policy's, the head read now (LoRA folded)."""
        body = body if body is not None else self.body
        head = head if head is not None else lm_head_params(self.model)
        ids = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
        labels = [p.chosen_labels for p in pairs] + [p.rejected_labels for p in pairs]
        input_ids, mask, lab = batch_tensors(ids, labels, self.tokenizer.pad_token_id, self.device)
        seq = token_logprobs(body, head, input_ids, mask, lab, self.backend, self.autocast, self.fp32,
                             head_dtype=self.head_dtype).sum(-1)
        return seq[: len(pairs)], seq[len(pairs):]

    @torch.no_grad()
    def _reference_logprobs(self) -> None:
        """Fill every pair's reference log-probs once: from the cache file when it matches, else computed and cached."""
        path = self.run_dir / "reference_logprobs.pt"
        key = self._cache_key()
        if path.is_file():
            cache = torch.load(path, weights_only=True)
            if cache.get("key") == key:
                self._fill(cache)
                return
        ref = None
        body, head = self.body, lm_head_params(self.model)
        if self.cfg.dpo.reference_model:
            from ..models import attn_implementation, load_causal_lm, load_tokenizer, resolve_model_path

            path_ref = resolve_model_path(self.cfg.dpo.reference_model, "dpo.reference_model")
            if load_tokenizer(path_ref).get_vocab() != self.tokenizer.get_vocab():
                raise UserError(f"dpo.reference_model: {path_ref!r} has a different tokenizer than the policy; "
                                "the reference must score the policy's token ids")
            ref = load_causal_lm(path_ref, attn_implementation(self.cfg.model.attn_implementation, self.device, self.bf16), self.device,
                                 "dpo.reference_model").eval()
            body, head = backbone(ref), checked_lm_head(ref, "dpo.reference_model")  # its own class: its own transform
        self.set_train(False)
        bs = self.cfg.train.eval_batch_size
        cache = {"key": key}
        for split, pairs in (("train", self.train_set), ("eval", self.eval_set)):
            parts = []
            for s in range(0, len(pairs), bs):
                c, r = self.sequence_logprobs(pairs[s:s + bs], body, head)
                parts.append(torch.stack([c, r], dim=-1).cpu())
            cache[split] = torch.cat(parts) if parts else torch.zeros(0, 2)
        del ref
        if self.world.main:  # every rank computed the same (before sharding); one writes the cache
            self.run_dir.mkdir(parents=True, exist_ok=True)
            torch.save(cache, path)
        self._fill(cache)

    def _cache_key(self) -> str:
        """What the cached log-probs depend on: the token ids of every pair and the reference model's weights (a
        content hash, not its path: a folder overwritten with new weights must not be served the old log-probs)."""
        from ..models import resolve_model_path

        ref = self.cfg.dpo.reference_model
        path = resolve_model_path(ref, "dpo.reference_model") if ref else resolve_model_path(self.cfg.model.policy, "model.policy")
        h = hashlib.sha256(weights_digest(path).encode())
        for split in (self.train_set, self.eval_set):
            h.update(json.dumps([[p.chosen_ids, p.chosen_labels, p.rejected_ids, p.rejected_labels] for p in split]).encode())
            h.update(b"|")
        return h.hexdigest()

    def _fill(self, cache: dict[str, Tensor]) -> None:
        for split, pairs in (("train", self.train_set), ("eval", self.eval_set)):
            for p, (c, r) in zip(pairs, cache[split].tolist()):
                p.ref_chosen, p.ref_rejected = c, r

    # -------------------------------------------------------------------------------------- loss

    def _loss(self, pairs: list[Pair]) -> tuple[Tensor, dict[str, Tensor]]:
        pc, pr = self.sequence_logprobs(pairs)
        ref = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs], dtype=torch.float32, device=pc.device)
        loss, rc, rr = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], self.cfg.dpo.beta, self.cfg.dpo.loss_type)
        stats = {"loss": loss.detach(), "rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
                 "rewards/accuracy": (rc > rr).float().mean(), "rewards/margin": (rc - rr).mean(),
                 "logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()}
        return loss, stats

    def compute_loss(self, pairs: list[Pair]) -> tuple[Tensor, dict[str, float]]:
        return self._loss(pairs)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_set:
            return {}
        self.set_train(False)
        bs, sums = self.cfg.train.eval_batch_size, {}
        for s in range(0, len(self.eval_set), bs):
            chunk = self.eval_set[s:s + bs]  # every rank the whole set: FSDP's forwards are collective
            _, stats = distributed.in_root(self.model, self._loss, chunk)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
        return {f"eval/{k}": v / len(self.eval_set) for k, v in sums.items()}

    def save_final_model(self):
        return self.save_model_folder(self.model, self.tokenizer, self.cfg.model.lora.enabled)

"""The one RL loop for language models: PPO (Ziegler et al. 2019; Ouyang et al. 2022) and the critic-free
policy-gradient family (GRPO, RLOO, REINFORCE, REINFORCE++, ReMax), with PPO epochs or a TRPO step. One iteration:

1. rollout:    sample ``generation.n`` responses per prompt (KV cache); tokens after EOS are masked out;
2. score:      old log-probs, reference log-probs (and values, with a critic) from backbone hidden states
               (``rlhf_fast.ops`` on the LM-head weight: no [tokens x vocab] logits), each response's score;
3. advantages: ``algorithm.adv_estimator``: gae (r_t = -kl_coef KL_t + score on the last token, critic
               values, GAE, whitened), reinforce_pp (the same token rewards, discounted returns, whitened), or
               an outcome estimator on the sequence score (grpo | rloo | reinforce | remax); the KL to the
               reference goes in the reward or, with ``algorithm.kl_in: loss``, in the policy loss;
4. update:     ``policy_update: ppo``: ``ppo_epochs`` passes over shuffled minibatches (gradient accumulation
               over micro-batches) of the policy loss (ppo_clip | cispo | sapo, token or sequence ratio)
               + vf_coef * clipped value loss (- entropy bonus), grad-norm clip, AdamW; ``trpo``: one
               natural-gradient step in the ``max_kl`` trust region, the critic on its own AdamW steps;
5. KL controller update, logging, evaluation, checkpoint.

``RLTrainer(config).train()`` runs it; ``rlhf-fast rl --config ...`` (or ``rlhf-fast ppo``) is the same through the CLI.
"""
from __future__ import annotations

import math
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import distributed, ops
from ..checkpoint import StopRequest
from ..config import Config, load_config, resume_config_path
from ..data import PromptSampler, load_prompts
from ..errors import UserError
from ..integrations.hf import LMHead, lm_head_params
from ..models import (TopCopy, TrunkSplit, add_lora, attn_implementation, backbone, bf16_enabled, build_critic, checked_lm_head, compile_enabled,
                      disable_dropout, enable_gradient_checkpointing, eos_ids, frozen_copy, hidden_states, load_causal_lm, load_tokenizer,
                      maybe_compile, resolve_model_path, train_top_layers, unwrap)
from ..rewards import CombinedReward
from ..rollout import Rollout, RunningMoments, generate, token_rewards
from ..trust_region import make_fvp, trpo_step
from .backend import get_backend
from .loop import Loop, build_optimizer, resolve_device, seed_everything


def check_distributed(cfg: Config, world) -> None:
    """What a torchrun launch supports so far; raises UserError naming the key otherwise."""
    p, a, ws = cfg.ppo, cfg.algorithm, world.size
    if p.batch_size % ws or p.minibatch_size % ws or (p.minibatch_size // ws) % p.micro_batch_size:
        raise UserError(f"ppo.batch_size ({p.batch_size}) and ppo.minibatch_size ({p.minibatch_size}) must split evenly over "
                        f"{ws} ranks, and a rank's share of a minibatch into ppo.micro_batch_size ({p.micro_batch_size})")
    if a.policy_update != "ppo":
        raise UserError(f"algorithm.policy_update={a.policy_update} is not supported under torchrun yet (ppo is, with every "
                        "advantage estimator and critic)")


class KLController:
    """Fixed beta, or the adaptive controller of Ziegler et al. (2019, sec. 2.2) when ``target`` is set:
    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_samples / horizon)."""

    def __init__(self, kl_coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        if self.target is not None and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_samples / self.horizon


def _chunks(idx: Tensor, size: int) -> list[Tensor]:
    return [idx[s:s + size] for s in range(0, len(idx), size)]


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, world: distributed.World = distributed.World()) -> float:
    """1 - Var[returns - values] / Var[returns] over response tokens (1 is a perfect critic), over every rank's."""
    r, v = returns[mask], values[mask]
    var = world.variance(r)
    return float("nan") if var == 0 else 1 - world.variance(r.double() - v.double()) / var


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class RLTrainer(Loop):
    """One unit of the loop (``trainers.loop``) is one RL iteration: :meth:`run_unit`."""

    name = "rl"

    def __init__(self, config: Config, resume: str | Path | None = None, callbacks=()):
        self.cfg = cfg = config.validate()
        self.callbacks = list(callbacks)
        self.run_dir = Path(resume) if resume is not None else Path(cfg.output_dir)
        self.world, self.device = distributed.setup(resolve_device(cfg.device), cfg.dist_timeout_s)
        if self.world.active:
            check_distributed(cfg, self.world)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)  # every rank builds the same models
        self.backend = get_backend(cfg.kernels)
        self.bf16 = bf16_enabled(cfg.model.bf16, self.device)
        self.keep_hidden = cfg.generation.keep_hidden == "true" or (cfg.generation.keep_hidden == "auto" and not self.bf16)

        # Models: policy, reference (a frozen copy, or the LoRA policy with adapters off), critic, rewards.
        path = resolve_model_path(cfg.model.policy, "model.policy")
        self.tokenizer = load_tokenizer(path)
        self.reward_fn = CombinedReward(cfg.reward.sources, self.device, cfg.reward.batch_size)
        attn = attn_implementation(cfg.model.attn_implementation, self.device, self.bf16)
        if cfg.algorithm.policy_update == "trpo" and attn == "flash_attention_2":  # TRPO's Fisher products need a double backward
            if cfg.model.attn_implementation != "auto":
                raise UserError("model.attn_implementation=flash_attention_2 has no double backward, which TRPO's Fisher-vector "
                                "products need: use sdpa or eager")
            attn = "sdpa"
        policy = load_causal_lm(path, attn, self.device)
        disable_dropout(policy)
        self.data = load_prompts(cfg.data, self.tokenizer, cfg.generation.max_new_tokens, getattr(policy.config, "max_position_embeddings", None))
        # The reference: the LoRA policy with its adapters off; or, when only the top layers train and the bottom can
        # be shared, a frozen copy of the top layers run from the policy's bottom output; else a frozen copy of it all.
        self.ref, self.ref_top, self.split, n_top = None, None, None, cfg.model.trainable_layers
        if (not cfg.model.lora.enabled and n_top and cfg.model.share_frozen_trunk and TrunkSplit.supported(policy)
                and not compile_enabled(cfg.model.compile, self.device)):
            train_top_layers(policy, n_top)
            self.split = TrunkSplit(backbone(policy), n_top)
            self.ref_top = TopCopy(*self.split.frozen_top_copy())
        self.critic = None  # only GAE reads values: no value head, no critic memory for the other estimators
        if cfg.needs_critic:  # before LoRA wraps the policy: a critic copy takes plain weights
            self.critic = build_critic(policy, cfg.critic, self.tokenizer, self.reward_fn.reward_model_path, self.device, self.split)
            disable_dropout(self.critic)
        if cfg.model.lora.enabled:
            policy = add_lora(policy, cfg.model.lora)
        elif self.split is None:
            self.ref = frozen_copy(policy)
            if n_top:
                train_top_layers(policy, n_top)
        self.policy = policy
        if cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(policy, cfg.model.lora.enabled)
        head = checked_lm_head(policy)  # the head and logit transform (softcap, scale) every scoring / loss reads
        if cfg.algorithm.policy_update == "trpo" and head.softcap is not None:
            raise UserError(f"algorithm.policy_update=trpo: model.policy caps its logits (softcap={head.softcap}), which "
                            "TRPO's Fisher-vector products (ops.linear_fisher_product) do not model; use policy_update=ppo")
        self.eos_ids = eos_ids(self.tokenizer, policy)
        if self.world.active:  # FSDP2: each model's decoder layers, then the model itself, a root of its own
            kw = dict(mesh=self.world.mesh, bf16_params=self.bf16, cpu_offload=cfg.fsdp_cpu_offload)
            distributed.shard(policy, backbone(unwrap(policy)).layers, **kw)
            if self.ref is not None:
                distributed.shard(self.ref, backbone(self.ref).layers, **kw)
            if self.split is not None:
                distributed.shard(self.ref_top, self.ref_top.layers, **kw)
            if self.critic is not None:
                c = self.critic
                distributed.shard(c, c.top_layers if c.top_layers is not None else c.body.layers if c.body is not None else [], **kw)
            seed_everything(cfg.seed + 1000003 * self.world.rank)  # then each rank samples its own responses
        flag = cfg.model.compile
        self.policy_body = maybe_compile(backbone(policy), flag, self.device)
        self.ref_body = maybe_compile(backbone(self.ref), flag, self.device) if self.ref is not None else self.policy_body
        self.critic_body = maybe_compile(self.critic.body, flag, self.device) if self.critic is not None and self.critic.body is not None else None

        # Optimizer over what trains: the policy (all weights, or the LoRA adapters) and the critic. Under TRPO the
        # policy moves by its natural-gradient step only: its parameters never get a gradient at an AdamW step.
        p = cfg.ppo
        self.policy_params = [q for q in policy.parameters() if q.requires_grad]
        self.critic_params = [q for q in self.critic.parameters() if q.requires_grad] if self.critic is not None else []
        if cfg.algorithm.policy_update == "trpo" and head.weight.requires_grad and not any(head.weight is q for q in self.policy_params):
            raise UserError("algorithm.policy_update=trpo: the LM-head weight is computed from trainable parameters (LoRA on "
                            "lm_head), which TRPO's Fisher-vector products do not see; leave lm_head out of model.lora.target_modules")
        if cfg.algorithm.policy_update == "trpo" and self.critic is not None and self.critic.body is None and self.critic.top_layers is None:
            raise UserError("algorithm.policy_update=trpo steps the policy alone: a critic on the policy's backbone would move it "
                            "too; set critic.share_backbone=false")
        groups = [{"params": self.policy_params, "lr": p.lr}]
        if self.critic_params:
            groups.append({"params": self.critic_params, "lr": cfg.critic.lr or p.lr})
        steps_per_update = p.ppo_epochs * math.ceil(p.batch_size * cfg.generation.n / p.minibatch_size)
        self.optimizer, self.scheduler = build_optimizer(
            groups, lr=p.lr, adam_betas=p.adam_betas, adam_eps=p.adam_eps, weight_decay=p.weight_decay, lr_schedule=p.lr_schedule,
            warmup_steps=p.warmup_steps, total_steps=p.iterations * steps_per_update)
        self.kl_ctl = KLController(p.kl_coef, p.kl_target, p.kl_horizon)
        self.score_moments = RunningMoments()
        self.sampler = PromptSampler(len(self.data.train), p.batch_size, cfg.seed)
        self.skipped_updates = 0
        self.start(p.iterations, cfg.eval.every, resume)

    @classmethod
    def from_cli(cls, config_path: str | None, overrides: list[str], resume: str | None) -> "RLTrainer":
        """The CLI's constructor: a resumed run reads its own config.yaml (overrides still apply)."""
        return cls(load_config(resume_config_path(config_path, resume), overrides), resume=resume)

    # ------------------------------------------------------------------------------------------ forwards

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def fp32(self):
        """Outside autocast: the ops take the LM head in one dtype and accumulate in fp32 themselves."""
        return torch.autocast(self.device.type, enabled=False) if self.bf16 else nullcontext()

    def _read_head(self, ref: bool) -> LMHead:
        if ref and self.ref is not None:
            return lm_head_params(self.ref)
        if ref and self.cfg.model.lora.enabled:  # the policy with its adapters off, on the head too
            with self.policy.disable_adapter():
                return lm_head_params(self.policy)
        return lm_head_params(self.policy)  # with TrunkSplit the reference's too (the head is frozen, shared)

    def _in_hidden_dtype(self, head: LMHead) -> LMHead:
        return head._replace(weight=head.weight.to(torch.bfloat16) if self.bf16 else head.weight.float())

    def head(self) -> LMHead:
        """The policy's LM head, read now (``integrations.hf.lm_head_params``: a LoRA head is folded), its weight in
        the dtype of :meth:`response_hidden` (a differentiable bf16 view under bf16)."""
        return self._in_hidden_dtype(self._read_head(False))

    def heads(self) -> tuple[LMHead, LMHead]:
        """(policy head, reference head) as :meth:`head`, one cast when they share the weight. The reference is the
        policy's class, so they share the logit transform; the reference's weight is its own."""
        policy, ref = self._read_head(False), self._read_head(True)
        cast = self._in_hidden_dtype(policy)
        return cast, (cast if ref.weight is policy.weight else self._in_hidden_dtype(ref))

    def response_hidden(self, body, ro: Rollout) -> Tensor:
        """[B, T, H] hidden states at the positions that predict the response tokens (bf16 under bf16, else fp32)."""
        with self.autocast():
            h = hidden_states(body, ro.input_ids, ro.attention_mask)
        return self._response_positions(h, ro)

    def _response_positions(self, h: Tensor, ro: Rollout) -> Tensor:
        h = h[:, ro.prompt_len - 1: -1]
        return h.to(torch.bfloat16) if self.bf16 else h.float()

    def sampling(self) -> dict:
        """``rollout.generate``'s options: under torchrun every rank runs the same number of forwards (transformers'
        ``synced_gpus``) and no shared-prefix forward, whose presence depends on the rank's prompts."""
        g = self.cfg.generation
        return dict(share_prefix=g.share_prefix and not self.world.active, synced=self.world.active, packed=g.packed_weights)

    def kept_trunk(self, prompts: list):
        """The module whose output sampling keeps as the rollout's ``trunk_hidden`` (``rollout.generate``): the shared
        frozen bottom's last layer; None without a shared trunk, with ``generation.keep_hidden`` off, or when it would
        exceed ``model.trunk_cache_mb``. Policy and reference tops both run from it, so they see the same input."""
        if not self.keep_hidden or self.split is None:
            return None
        return self.split.boundary() if self.rollout_fits(prompts) else None

    def kept_last(self, prompts: list):
        """The policy's final norm, whose outputs sampling keeps as the rollout's ``last_hidden``, so that scoring and
        the evaluation's KL read the policy's hidden states without another forward of it: with
        ``generation.keep_hidden`` and ``keep_last_hidden``, in one process (FSDP2's root forward must run), while it
        fits ``model.trunk_cache_mb``. They equal a fresh forward's to fp32 rounding (KV-cached decode, packed
        weights), so the policy's log-probs and the reference's differ by ~1e-7 (not 0) while the weights are equal."""
        norm = getattr(backbone(self.policy), "norm", None)
        if not (self.keep_hidden and self.cfg.generation.keep_last_hidden) or self.world.active or not isinstance(norm, torch.nn.Module):
            return None
        return norm if self.rollout_fits(prompts) else None

    def sampled_hidden(self, ro: Rollout) -> Tensor:
        """The policy's response hidden states: those sampling kept (``ro.last_hidden``), else a forward."""
        return self.policy_hidden(ro) if ro.last_hidden is None else self._response_positions(ro.last_hidden, ro)

    def rollout_fits(self, prompts: list) -> bool:
        """Whether one [B, P + T, H] fp32 tensor of the rollout of ``prompts`` fits ``model.trunk_cache_mb``."""
        columns = max(len(p.ids) for p in prompts) + self.cfg.generation.max_new_tokens
        return self.trunk_fits(len(prompts) * columns)

    def trunk_fits(self, positions: int) -> bool:
        """Whether the bottom's fp32 output for ``positions`` token positions fits ``model.trunk_cache_mb``."""
        return positions * unwrap(self.policy).config.hidden_size * 4 <= self.cfg.model.trunk_cache_mb * 2**20

    def bottom(self, ro: Rollout) -> Tensor:
        """The frozen bottom's output for ``ro``, computed once and kept on it (``ro.trunk_hidden``)."""
        if ro.trunk_hidden is None:
            with torch.no_grad(), self.autocast():
                ro.trunk_hidden = self.split.bottom(ro.input_ids, ro.attention_mask)
        return ro.trunk_hidden

    def policy_hidden(self, ro: Rollout) -> Tensor:
        if self.split is None:
            return self.response_hidden(self.policy_body, ro)
        with self.autocast():
            return self._response_positions(self.split.top(self.bottom(ro), ro.attention_mask, prefix=ro.prefix_len), ro)

    def ref_hidden(self, ro: Rollout) -> Tensor:
        """The reference's response hidden states; under FSDP2 its copies (top or full) run as their own root's forward."""
        if self.split is not None:  # its own top layers on the shared trunk's output (a module call: FSDP2's root forward)
            with self.autocast():
                return self._response_positions(self.ref_top(self.split, self.bottom(ro), ro.attention_mask, ro.prefix_len), ro)
        if self.ref is None:  # LoRA: the reference is the same model with its adapters switched off
            with self.policy.disable_adapter():
                return self.response_hidden(self.policy_body, ro)
        return distributed.in_root(self.ref, self.response_hidden, self.ref_body, ro)

    def values(self, policy_hidden: Tensor | None, ro: Rollout) -> Tensor | None:
        """[B, T] float32 values: the critic's head on the policy's hidden states, its own top layers' (from the shared
        trunk) or its own body's; under FSDP2 as the critic root's forward."""
        return None if self.critic is None else distributed.in_root(self.critic, self._values, policy_hidden, ro)

    def _values(self, policy_hidden: Tensor | None, ro: Rollout) -> Tensor:
        c = self.critic
        if c.top_layers is not None:  # the critic's own top layers, from the shared trunk
            with self.autocast():
                h = self._response_positions(self.split.top(self.bottom(ro), ro.attention_mask, c.top_layers, c.top_norm, ro.prefix_len), ro)
        else:
            h = policy_hidden if self.critic_body is None else self.response_hidden(self.critic_body, ro)
        with self.fp32():
            return c.value(h)

    # ------------------------------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score(self, ro: Rollout) -> None:
        """Fill ro.logprobs, ro.ref_logprobs, ro.kl and, with a critic, ro.values (per token, zero outside the response)."""
        cfg, temp = self.cfg, self.cfg.generation.temperature
        head, ref_head = self.heads()
        weight, ref_weight, tf = head.weight, ref_head.weight, dict(logit_scale=head.logit_scale, softcap=head.softcap)
        parts = {k: [] for k in ("logprobs", "ref_logprobs", "values", "kl", "trunk_hidden")}
        keep_bottom = self.split is not None and self.trunk_fits(ro.input_ids.numel())

        def micro(mb: Rollout) -> tuple[Tensor, ...]:  # the policy's root forward under FSDP2 (distributed.in_root)
            labels = mb.labels
            h, rh = self.sampled_hidden(mb), self.ref_hidden(mb)
            with self.fp32():
                # with the last hidden states kept, the sampler's own log-probs of the drawn tokens are the old log-probs
                # (the same weights, scores and temperature; equal to the head's on them to fp32 rounding)
                lp = (mb.sampled_logprobs if mb.last_hidden is not None and mb.sampled_logprobs is not None  # 0 outside the mask
                      else self.backend.logprobs(h, weight, labels, temp, **tf))
                ref_lp = self.backend.logprobs(rh, ref_weight, labels, temp, **tf)
                if cfg.ppo.kl_estimator == "full":
                    kl = self.backend.kl(h, weight, rh, ref_weight, labels, temp, **tf)
                else:
                    kl = self.backend.kl_penalty(lp, ref_lp, cfg.ppo.kl_estimator)
            return h, lp, ref_lp, torch.where(mb.response_mask, kl, 0.0)

        for idx in _chunks(torch.arange(len(ro)), cfg.ppo.micro_batch_size):
            mb = ro.select(idx)
            h, lp, ref_lp, kl = distributed.in_root(self.policy, micro, mb)
            if keep_bottom:  # for the update epochs, which then run the top layers only
                parts["trunk_hidden"].append(mb.trunk_hidden)
            parts["logprobs"].append(lp)
            parts["ref_logprobs"].append(ref_lp)
            if self.critic is not None:
                parts["values"].append(self.values(h, mb))
            parts["kl"].append(kl)
        for k, v in parts.items():
            setattr(ro, k, torch.cat(v) if v else None)
        ro.last_hidden = None  # the update's forwards need gradients (and the weights move)
        distributed.reshard(self.ref, self.ref_top)

    def sequence_scores(self, ro: Rollout) -> tuple[Tensor, dict[str, float]]:
        """Rewards of the responses, then EOS penalty, clipping and normalisation; raw terms for logging."""
        raw, terms = self.reward_fn(ro.prompts, ro.responses, ro.messages)
        every = self.world.gather(raw)  # as many rows on every rank
        stats = {"reward/mean": every.mean().item(), "reward/std": every.std().item() if len(every) > 1 else 0.0}
        if len(terms) > 1:
            stats |= {f"reward/{k}": v.mean().item() for k, v in terms.items()}
        ro.extras["raw_scores"] = raw
        return self.shape_scores(raw, ro.no_eos, update_moments=True), stats

    def shape_scores(self, raw: Tensor, no_eos: Tensor, update_moments: bool = False) -> Tensor:
        """EOS penalty, clipping and normalisation (the running moments move with sampled scores only)."""
        rcfg = self.cfg.reward
        scores = raw.clone()
        if rcfg.missing_eos_penalty:
            scores = torch.where(no_eos.cpu(), scores - rcfg.missing_eos_penalty, scores)
        if rcfg.clip is not None:
            scores = scores.clamp(-rcfg.clip, rcfg.clip)
        if rcfg.normalize and self.world.all(bool(torch.isfinite(scores).all())):
            if update_moments:  # the moments of every rank's scores
                self.score_moments.update(self.world.gather(scores))
            scores = (scores - self.score_moments.mean) / self.score_moments.std
        return scores.to(self.device)

    @torch.no_grad()
    def greedy_scores(self, prompts: list) -> Tensor:
        """ReMax's baseline (Li et al. 2023, eq. 6): the shaped score of each prompt's greedy response."""
        ro = generate(self.policy, self.tokenizer, prompts, self.cfg.generation, self.eos_ids, self.device, self.autocast, greedy=True,
                      **self.sampling())
        raw, _ = self.reward_fn(ro.prompts, ro.responses, ro.messages)
        return self.shape_scores(raw, ro.no_eos)

    # ------------------------------------------------------------------------------------------ the loss

    def compute_loss(self, mb: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one micro-batch: policy loss (- entropy bonus, + in-loss KL) + vf_coef * clipped value loss (with a critic)."""
        p = self.cfg.ppo
        pg_loss, out, h = distributed.in_root(self.policy, self.policy_loss, mb)
        loss = pg_loss
        if self.critic is not None:
            values = self.values(h, mb)
            vf_loss, vstats = ops.ppo_value_loss(values, mb.values, mb.returns, mb.response_mask, clip_eps=p.vf_clip_eps, loss_agg=p.loss_agg)
            loss = pg_loss + p.vf_coef * vf_loss
            out |= {"loss/value": vf_loss.detach(), "value/clipfrac": vstats["vf_clipfrac"]}
        out["loss/total"] = loss.detach()
        return loss, out

    def policy_loss(self, mb: Rollout) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """(policy loss, its stats, the policy's response hidden states): the policy's root forward under FSDP2."""
        p, a = self.cfg.ppo, self.cfg.algorithm
        head = self.head()
        h = self.policy_hidden(mb)
        kl_in_loss = a.kl_in == "loss" and self.kl_ctl.value > 0
        with self.fp32():
            pg_loss, stats = self.backend.policy_loss(
                h, head.weight, mb.labels, mb.logprobs, mb.advantages, mb.response_mask, clip_eps=p.clip_eps, clip_eps_high=p.clip_eps_high,
                dual_clip=p.dual_clip, entropy_coef=p.entropy_coef, temperature=self.cfg.generation.temperature, loss_agg=p.loss_agg,
                policy_loss=a.policy_loss, importance_ratio=a.importance_ratio, loss_norm_length=a.loss_norm_length,
                sapo_tau_pos=a.sapo_tau_pos, sapo_tau_neg=a.sapo_tau_neg, logit_scale=head.logit_scale, softcap=head.softcap,
                **(dict(ref_logprobs=mb.ref_logprobs, kl_coef=self.kl_ctl.value, kl_estimator=p.kl_estimator,
                        kl_log_ratio_clip=a.kl_log_ratio_clip) if kl_in_loss else {}))
        out = {k: stats[k] for k in ("clipfrac", "approx_kl", "ratio_mean", "entropy") if k in stats}
        if kl_in_loss:
            out["loss/kl"] = stats["kl"]
        out["loss/policy"] = pg_loss.detach()
        return pg_loss, out, h

    def set_train(self, mode: bool) -> None:
        for m in (self.policy, self.critic):
            if m is not None:
                m.train(mode)

    def _micro_weights(self, micros: list[Tensor], mask: Tensor) -> list[float]:
        """Each micro-batch's share of the minibatch loss (over all ranks' parts of it: token counts are summed over
        ranks, and FSDP averages gradients, hence the factor world size), so accumulated gradients equal the minibatch's."""
        return self.world.shares([float(mask[m].sum()) if self.cfg.ppo.loss_agg == "token-mean" else float(len(m)) for m in micros])

    def update(self, ro: Rollout, stand_in: Rollout | None = None) -> dict[str, float]:
        """ppo_epochs x shuffled minibatches; an optimizer step per minibatch, skipped on a non-finite loss/gradient.

        ``stand_in`` (under torchrun, when ranks may hold different numbers of rows: dynamic sampling): a rank with
        fewer minibatches or micro-batches than another runs this row in their place with weight 0, since FSDP2's
        gathers and reduce-scatters need every rank in every forward and backward."""
        p = self.cfg.ppo
        sums, total_w, grad_norms = {}, 0.0, []
        mask = ro.response_mask.cpu()  # micro-batch weights index it with CPU permutations: copied once per update
        self.set_train(True)
        for _ in range(p.ppo_epochs):
            perm = torch.randperm(len(ro))
            minibatches = _chunks(perm, p.minibatch_size // self.world.size)  # each rank its share of a minibatch
            if stand_in is not None:
                minibatches += [perm[:0]] * (self.world.max(len(minibatches)) - len(minibatches))
            for minibatch in minibatches:
                micros = _chunks(minibatch, p.micro_batch_size)
                micro_batches = [(w, lambda micro=micro: self.compute_loss(ro.select(micro)))
                                 for micro, w in zip(micros, self._micro_weights(micros, mask))]
                if stand_in is not None:
                    micro_batches += [(0.0, lambda: self.compute_loss(stand_in))] * (self.world.max(len(micros)) - len(micros))
                step_sums, step_w, grad_norm = self.optimizer_step(micro_batches, self.policy_params + self.critic_params, p.max_grad_norm)
                for k, v in step_sums.items():
                    sums[k] = sums.get(k, 0.0) + v
                total_w += step_w
                if math.isfinite(grad_norm):
                    grad_norms.append(grad_norm)
        self.set_train(False)
        out = self.world.mean_metrics(sums, total_w)
        out = {("policy/" + k if "/" not in k else k): v for k, v in out.items()}
        out["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else float("nan")
        return out

    def trpo_update(self, ro: Rollout) -> dict[str, float]:
        """One TRPO step of the policy on the whole rollout (Schulman et al. 2015, app. C), then the critic's epochs.

        Surrogate (minimised): -masked_mean(ratio * A) (- entropy bonus, + in-loss KL), ratio = pi / pi_old. The
        trust region is the mean over response tokens of the exact KL(pi_old || pi) over the vocabulary
        (``ops.linear_kl``); its Fisher-vector products come from ``trust_region.make_fvp`` (double-vjp through the
        uncompiled trunk, ``ops.linear_fisher_product`` at the head) on every ``algorithm.fisher_every``-th response. Head math in fp32 (the head weight is a leaf,
        so a trainable tied head enters F exactly); no micro-batching: the rollout is one batch.
        """
        cfg, a, p = self.cfg, self.cfg.algorithm, self.cfg.ppo
        temp, mask, labels = cfg.generation.temperature, ro.response_mask, ro.labels
        # the head weight itself (a leaf: updated in place by the step, a trainable tied head enters F exactly);
        # __init__ refused a softcap and a head folded from LoRA adapters, which the Fisher products do not model
        head = lm_head_params(self.policy)
        body, weight, scale = backbone(self.policy), head.weight, head.logit_scale

        def hidden(batch: Rollout = ro) -> Tensor:
            if self.split is not None:  # the top layers from the kept bottom output
                return self.policy_hidden(batch).float()
            with self.autocast():
                h = hidden_states(body, batch.input_ids, batch.attention_mask)
            return h[:, batch.prompt_len - 1: -1].float()

        # Each trunk forward costs as much as the rest of the step: pi_old's hidden states are those of the first
        # surrogate call (at theta_old), and the line search's KL check reuses the hidden states its surrogate call
        # just computed at the same trial parameters (line_search calls surrogate_fn, then kl_fn).
        seen: dict[str, Tensor] = {}

        def surrogate() -> Tensor:
            h = hidden()
            seen.setdefault("old", h.detach())
            seen["last"] = h.detach()
            lp, ent = self.backend.logprobs(h, weight, labels, temp, return_entropy=True, logit_scale=scale)
            loss = -ops.masked_mean(torch.exp((lp - ro.logprobs).clamp(max=20.0)) * ro.advantages, mask)
            if p.entropy_coef:
                loss = loss - p.entropy_coef * ops.masked_mean(ent, mask)
            if a.kl_in == "loss" and self.kl_ctl.value > 0:
                kl = ops.kl_penalty(lp, ro.ref_logprobs, p.kl_estimator, log_ratio_clip=a.kl_log_ratio_clip)
                loss = loss + self.kl_ctl.value * ops.masked_mean(kl, mask)
            return loss

        def mean_kl() -> Tensor:  # KL(pi_old || pi_theta): linear_kl's first argument is the distribution sampled
            h = seen.pop("last", None)
            kl = self.backend.kl(seen["old"], weight, hidden() if h is None else h, weight, labels, temp, logit_scale=scale)
            return ops.masked_mean(kl, mask)

        self.set_train(True)
        # Fisher-vector products on every k-th response (as OpenAI baselines' TRPO): CG's cost falls k-fold, F stays exact
        # over the vocabulary and unbiased over the batch.
        sub = ro.select(torch.arange(0, len(ro), a.fisher_every))
        # softmax(scale * z / T) = softmax(z / (T / scale)): a logit scale is a temperature to the Fisher product
        fvp = make_fvp(self.policy_params, lambda: hidden(sub), weight, sub.response_mask, temperature=temp / scale, damping=a.cg_damping)
        try:
            out = trpo_step(self.policy_params, surrogate, mean_kl, fvp, max_kl=a.max_kl, cg_iters=a.cg_iters,
                            backtrack_ratio=a.backtrack_ratio, max_backtracks=a.max_backtracks)
        except FloatingPointError:  # a non-finite surrogate or gradient: no step, as the PPO update skips one
            self.skipped_steps += 1
            out = {"accepted": False}
        del fvp  # frees the double-backward graph
        metrics = {f"trpo/{k}": float(v) for k, v in out.items()}
        if self.critic is not None:  # the value function on its own AdamW steps (the policy gets no gradient there)
            for _ in range(a.vf_epochs):
                for minibatch in _chunks(torch.randperm(len(ro)), p.minibatch_size):
                    micro_batches = [(len(micro) / len(minibatch), lambda micro=micro: self.value_loss(ro.select(micro)))
                                     for micro in _chunks(minibatch, p.micro_batch_size)]
                    sums, w, _ = self.optimizer_step(micro_batches, self.critic_params, p.max_grad_norm)
                    metrics |= {k: v / max(w, 1e-12) for k, v in sums.items()}
        self.set_train(False)
        return metrics

    def value_loss(self, mb: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.cfg.ppo
        with torch.no_grad():
            h = self.policy_hidden(mb) if self.critic.body is None and self.critic.top_layers is None else None
        loss, stats = ops.ppo_value_loss(self.values(h, mb), mb.values, mb.returns, mb.response_mask, clip_eps=p.vf_clip_eps,
                                         loss_agg=p.loss_agg)
        return loss, {"loss/value": loss.detach(), "value/clipfrac": stats["vf_clipfrac"]}

    # ------------------------------------------------------------------------------------------ advantages

    def filter_groups(self, ro: Rollout, scores: Tensor) -> tuple[Rollout, float]:
        """DAPO's dynamic sampling (Yu et al. 2025, eq. 11): groups whose scores are all equal have zero advantage
        under every group estimator, so they are dropped before the update (not resampled). Returns the rows
        kept (``extras["rows"]``: their indices in ``ro``) and the fraction of groups kept."""
        rows = torch.arange(len(ro), device=self.device)
        if not self.cfg.algorithm.dynamic_sampling:
            kept, frac = ro, 1.0
        else:
            _, inverse = torch.unique(ro.group_ids, return_inverse=True)
            lo = torch.full((int(inverse.max()) + 1,), float("inf"), device=self.device).scatter_reduce(0, inverse, scores, "amin")
            hi = torch.full_like(lo, float("-inf")).scatter_reduce(0, inverse, scores, "amax")
            varied = hi > lo
            rows = rows[varied[inverse]]
            kept, frac = ro.select(rows), float(varied.float().mean())
        kept.extras = dict(ro.extras, rows=rows)
        return kept, frac

    def stand_in(self, ro: Rollout) -> Rollout | None:
        """Under torchrun with dynamic sampling, a row the update can run with weight 0 (``update``); else None."""
        if not (self.world.active and self.cfg.algorithm.dynamic_sampling):
            return None
        row = ro.select(torch.arange(1))
        row.advantages = torch.zeros_like(row.logprobs)
        row.returns = row.values  # no value loss either
        return row

    def advantages(self, ro: Rollout, scores: Tensor) -> None:
        """ro.advantages (and ro.rewards / ro.returns where the estimator has them) from the shaped scores."""
        a, p, mask = self.cfg.algorithm, self.cfg.ppo, ro.response_mask
        beta = self.kl_ctl.value if a.kl_in == "reward" else 0.0
        if a.adv_estimator in ("gae", "reinforce_pp"):
            ro.rewards = token_rewards(scores, ro.kl, mask, beta)
            if a.adv_estimator == "gae":
                ro.advantages, ro.returns = self.backend.gae(ro.rewards, ro.values, mask, p.gamma, p.lam)
                if p.whiten_advantages and self.world.sum([float(mask.sum())])[0] > 1:  # over every rank's tokens
                    ro.advantages = ops.masked_whiten(ro.advantages, mask, process_group=self.world.process_group)
            else:
                ro.advantages = ops.reinforce_pp_advantages(ro.rewards, mask, gamma=p.gamma, process_group=self.world.process_group)
            return
        # Outcome estimators: one advantage per response, on its score less the priced KL of the whole response.
        seq = scores - beta * ro.kl.sum(-1)
        baseline = ro.extras.get("baseline_scores")
        if baseline is not None:
            baseline = baseline[ro.extras["rows"]]
        extra = ({"baseline": a.reinforce_baseline, "process_group": self.world.process_group}  # a batch mean over every rank's
                 if a.adv_estimator == "reinforce" else {})
        adv = ops.outcome_advantages(seq, ro.group_ids, estimator=a.adv_estimator, norm_adv_by_std=a.norm_adv_by_std,
                                     baseline_scores=baseline, **extra)
        ro.advantages = torch.where(mask, adv.unsqueeze(-1), 0.0)

    # ------------------------------------------------------------------------------------------ iteration

    def run_unit(self, stop: StopRequest) -> dict[str, float] | None:
        """One iteration; None when a stop was requested before the update (the caller rolls it back)."""
        cfg, n = self.cfg, self.cfg.generation.n
        t0 = time.perf_counter()
        batch = [self.data.train[i] for i in self.sampler.next_batch()]  # the same global batch on every rank: take a share
        share = len(batch) // self.world.size
        batch = batch[self.world.rank * share:(self.world.rank + 1) * share]
        prompts = [q for q in batch for _ in range(n)]
        ro = generate(self.policy, self.tokenizer, prompts, cfg.generation, self.eos_ids, self.device, self.autocast, keep_trunk=self.kept_trunk(prompts),
                      keep_last=self.kept_last(prompts), **self.sampling())
        ro.group_ids = torch.arange(len(batch), device=self.device).repeat_interleave(n)
        t_gen = time.perf_counter()
        self.score(ro)
        scores, metrics = self.sequence_scores(ro)
        if cfg.algorithm.adv_estimator == "remax":
            ro.extras["baseline_scores"] = self.greedy_scores(batch).repeat_interleave(n)
        t_score = time.perf_counter()
        if not self.world.all(not stop.requested):
            return None
        mask = ro.response_mask
        kl_seq = ro.kl.sum(-1)
        tensors = [x for x in (ro.logprobs, ro.ref_logprobs, ro.values, ro.kl) if x is not None]
        finite = self.world.all(all(bool(torch.isfinite(x[mask]).all()) for x in tensors) and bool(torch.isfinite(scores).all()))
        if finite:
            train_ro, metrics["groups/kept_frac"] = self.filter_groups(ro, scores)
            if self.world.sum([float(len(train_ro))])[0]:  # rows kept on any rank (each rank updates, with or without rows)
                self.advantages(train_ro, scores[train_ro.extras["rows"]])
                metrics |= (self.update(train_ro, self.stand_in(ro)) if cfg.algorithm.policy_update == "ppo"
                            else self.trpo_update(train_ro))
                if self.critic is not None:
                    m = train_ro.response_mask
                    metrics["value/explained_variance"] = explained_variance(train_ro.values, train_ro.returns, m, self.world)
                    metrics["value/mean"] = self.world.masked_mean(train_ro.values, m)
        else:  # a NaN/inf reward, log-prob or value: no update from this batch
            self.skipped_updates += 1
            print(f"iteration {self.iteration + 1}: non-finite rewards/log-probs/values, update skipped "
                  f"({self.skipped_updates} so far)", flush=True)
        t_end = time.perf_counter()
        kl_sum, n_seq = self.world.sum([float(kl_seq.sum()), float(len(ro))])
        self.kl_ctl.update(kl_sum / n_seq, int(n_seq))
        n_tokens = int(mask.sum())
        all_tokens = self.world.sum([float(n_tokens)])[0]  # throughput: every rank's tokens
        metrics |= {
            "score/mean": float(scores.mean()),
            "kl": float(kl_seq.mean()),  # KL(pi || pi_ref) per response (sum over tokens), the quantity kl_coef prices
            "kl_per_token": self.world.masked_mean(ro.kl, mask),
            "kl_coef": self.kl_ctl.value,
            "response/length": n_tokens / len(ro),
            "response/no_eos_frac": float(ro.no_eos.float().mean()),
            "lr": self.scheduler.get_last_lr()[0],
            "skipped_updates": self.skipped_updates,
            "skipped_steps": self.skipped_steps,
            "global_step": self.global_step,
            "time/generate": t_gen - t0,
            "time/score": t_score - t_gen,
            "time/update": t_end - t_score,
            "time/iteration": t_end - t0,
            "throughput/generate_tokens_per_s": all_tokens / max(t_gen - t0, 1e-9),
            "throughput/tokens_per_s": all_tokens / max(t_end - t0, 1e-9),
            "memory/peak_mb": peak_memory_mb(self.device),
        }
        k = self.cfg.num_samples_logged
        self.tracker.log_samples(self.iteration + 1, ro.prompts[:k], ro.responses[:k], ro.extras["raw_scores"][:k].tolist())
        return self.world.mean_metrics(metrics, 1.0) if self.world.active else metrics  # equal shares: the mean over ranks

    # ------------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward (and exact KL to the reference) on held-out prompts, with the same sampling noise every time.
        Under torchrun each rank samples its share of the prompts (the last shares padded with repeats whose results
        are dropped: every rank runs as many generate calls, FSDP's forwards being collective); the per-prompt
        results are gathered."""
        ecfg, cfg, world = self.cfg.eval, self.cfg, self.world
        prompts = self.data.eval[: ecfg.num_prompts] if ecfg.num_prompts else self.data.eval
        if not prompts:
            return {}
        t0 = time.perf_counter()
        share = -(-len(prompts) // world.size)
        mine = prompts[world.rank * share:(world.rank + 1) * share]
        valid = torch.arange(share) < len(mine)
        mine += prompts[:share - len(mine)]
        head, ref_head = self.heads()
        temp = ecfg.temperature or cfg.generation.temperature
        rewards, kls, lengths, first = [], [], [], None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(ecfg.seed + world.rank)
            for s in range(0, share, ecfg.batch_size):
                chunk = mine[s:s + ecfg.batch_size]
                ro = generate(self.policy, self.tokenizer, chunk, cfg.generation, self.eos_ids, self.device, self.autocast,
                              temperature=temp, keep_trunk=self.kept_trunk(chunk), keep_last=self.kept_last(chunk), **self.sampling())
                raw, _ = self.reward_fn(ro.prompts, ro.responses, ro.messages)
                rewards.append(raw.cpu())
                for idx in _chunks(torch.arange(len(ro)), cfg.ppo.micro_batch_size):
                    kls.append(distributed.in_root(self.policy, self._eval_kl, ro.select(idx), head, ref_head, temp).sum(-1).cpu())
                lengths.append(ro.response_mask.sum(-1).float().cpu())
                first = first or (ro.prompts, ro.responses, raw.tolist())
        distributed.reshard(self.ref, self.ref_top)
        keep = world.gather(valid)
        r, kl, length = (world.gather(torch.cat(x))[keep] for x in (rewards, kls, lengths))
        k = self.cfg.num_samples_logged
        self.tracker.log_samples(self.iteration, first[0][:k], first[1][:k], first[2][:k], tag="eval")
        return {"eval/reward": float(r.mean()), "eval/reward_std": float(r.std()) if len(r) > 1 else 0.0,
                "eval/kl": float(kl.mean()), "eval/response_length": float(length.mean()),
                "time/eval": time.perf_counter() - t0}

    def _eval_kl(self, mb: Rollout, head: LMHead, ref_head: LMHead, temp: float) -> Tensor:
        h, rh = self.sampled_hidden(mb), self.ref_hidden(mb)
        with self.fp32():
            return self.backend.kl(h, head.weight, rh, ref_head.weight, mb.labels, temp, logit_scale=head.logit_scale, softcap=head.softcap)

    def initial_metrics(self) -> dict[str, float]:
        return self.evaluate() if self.data.eval else {}

    def postfix(self, metrics: dict) -> dict[str, str]:
        out = {"reward": f"{metrics['reward/mean']:.3f}", "kl": f"{metrics['kl']:.3f}"}
        return out | ({"eval": f"{metrics['eval/reward']:.3f}"} if "eval/reward" in metrics else {})

    # ------------------------------------------------------------------------------------------ state

    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.policy} | ({"critic": self.critic} if self.critic is not None else {})

    def extra_state(self) -> dict:
        return {"kl_coef": self.kl_ctl.value, "score_moments": self.score_moments.state_dict(), "skipped_updates": self.skipped_updates}

    def load_extra_state(self, s: dict) -> None:
        self.kl_ctl.value = float(s["kl_coef"])
        self.score_moments.load_state_dict(s["score_moments"])
        self.skipped_updates = int(s["skipped_updates"])

    def save_final_model(self) -> Path:
        """The policy as a Hugging Face folder (a LoRA adapter when LoRA is on) plus the tokenizer."""
        return self.save_model_folder(self.policy, self.tokenizer, self.cfg.model.lora.enabled)


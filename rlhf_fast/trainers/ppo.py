"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), one iteration at a time:

1. rollout: sample a response per prompt (KV cache); tokens after EOS are masked out;
2. score:   old log-probs, reference log-probs and values from backbone hidden states (``rlhf_fast.ops``
            on the LM-head weight: no [tokens x vocab] logits), the sequence reward of each response;
3. rewards: r_t = -kl_coef * KL_t, plus the score on the last token; GAE advantages, whitened;
4. update:  ``ppo_epochs`` passes over shuffled minibatches (gradient accumulation over micro-batches) of
            the clipped policy loss + vf_coef * clipped value loss (- entropy bonus), grad-norm clip, AdamW;
5. KL controller update, logging, evaluation, checkpoint.

``PPOTrainer(config).train()`` runs it; ``rlhf-fast ppo --config ...`` is the same through the CLI.
"""
from __future__ import annotations

import math
import random
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import ops
from ..checkpoint import StopRequest, resume_latest, rng_state, save_checkpoint, set_rng_state
from ..config import Config, load_config, resume_config_path
from ..data import PromptSampler, load_prompts
from ..errors import UserError
from ..models import (add_lora, attn_implementation, backbone, bf16_enabled, build_critic, disable_dropout, enable_gradient_checkpointing, eos_ids,
                      frozen_copy, hidden_states, lm_head, load_causal_lm, load_tokenizer, maybe_compile, resolve_model_path,
                      train_top_layers, unwrap)
from ..rewards import CombinedReward
from ..rollout import Rollout, RunningMoments, generate, token_rewards
from ..tracking import Tracker
from .backend import get_backend


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


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over response tokens (1 is a perfect critic)."""
    r, v = returns[mask].double(), values[mask].double()
    var = r.var(unbiased=False) if r.numel() > 1 else r.new_tensor(0.0)
    return float("nan") if var == 0 else float(1 - (r - v).var(unbiased=False) / var)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class PPOTrainer:
    def __init__(self, config: Config, resume: str | Path | None = None, callbacks=()):
        self.cfg = cfg = config.validate()
        self.callbacks = list(callbacks)
        self.run_dir = Path(resume) if resume is not None else Path(cfg.output_dir)
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu" if cfg.device == "auto" else cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.backend = get_backend(cfg.kernels)
        self.bf16 = bf16_enabled(cfg.model.bf16, self.device)

        # Models: policy, reference (a frozen copy, or the LoRA policy with adapters off), critic, rewards.
        path = resolve_model_path(cfg.model.policy, "model.policy")
        self.tokenizer = load_tokenizer(path)
        self.reward_fn = CombinedReward(cfg.reward.sources, self.device, cfg.reward.batch_size)
        policy = load_causal_lm(path, attn_implementation(cfg.model.attn_implementation, self.device, self.bf16), self.device)
        disable_dropout(policy)
        self.data = load_prompts(cfg.data, self.tokenizer, cfg.generation.max_new_tokens, getattr(policy.config, "max_position_embeddings", None))
        self.critic = build_critic(policy, cfg.critic, self.tokenizer, self.reward_fn.reward_model_path, self.device)
        disable_dropout(self.critic)
        if cfg.model.lora.enabled:
            self.ref = None
            policy = add_lora(policy, cfg.model.lora)
        else:
            self.ref = frozen_copy(policy)
            if cfg.model.trainable_layers:
                train_top_layers(policy, cfg.model.trainable_layers)
        self.policy = policy
        if cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(policy, cfg.model.lora.enabled)
        weight, bias = lm_head(policy)
        if bias is not None:
            raise UserError("model.policy: LM heads with a bias are not supported")
        self.eos_ids = eos_ids(self.tokenizer, policy)
        flag = cfg.model.compile
        self.policy_body = maybe_compile(backbone(policy), flag, self.device)
        self.ref_body = maybe_compile(backbone(self.ref), flag, self.device) if self.ref is not None else self.policy_body
        self.critic_body = maybe_compile(self.critic.body, flag, self.device) if self.critic.body is not None else None

        # Optimizer over what trains: the policy (all weights, or the LoRA adapters) and the critic.
        p = cfg.ppo
        self.policy_params = [q for q in policy.parameters() if q.requires_grad]
        self.critic_params = [q for q in self.critic.parameters() if q.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": self.policy_params, "lr": p.lr}, {"params": self.critic_params, "lr": cfg.critic.lr or p.lr}],
            betas=tuple(p.adam_betas), eps=p.adam_eps, weight_decay=p.weight_decay, fused=True,  # fused: CPU and CUDA
        )
        warmup = p.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.kl_ctl = KLController(p.kl_coef, p.kl_target, p.kl_horizon)
        self.score_moments = RunningMoments()
        self.sampler = PromptSampler(len(self.data.train), p.batch_size, cfg.seed)
        self.iteration, self.global_step = 0, 0
        self.skipped_updates, self.skipped_steps = 0, 0
        self.evaluated_initial = False

        resume_iteration = None
        if resume is not None:
            state, ckpt = resume_latest(self.run_dir, self._trainable_modules(), self.optimizer, self.scheduler)
            self._load_state(state)
            resume_iteration = self.iteration
            print(f"resumed from {ckpt} (iteration {self.iteration})", flush=True)
        self.tracker = Tracker(self.run_dir, resume_iteration, config=cfg)

    @classmethod
    def from_cli(cls, config_path: str | None, overrides: list[str], resume: str | None) -> "PPOTrainer":
        """The CLI's constructor: a resumed run reads its own config.yaml (overrides still apply)."""
        return cls(load_config(resume_config_path(config_path, resume), overrides), resume=resume)

    # ------------------------------------------------------------------------------------------ forwards

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def fp32(self):
        """Outside autocast: the ops take the LM head in one dtype and accumulate in fp32 themselves."""
        return torch.autocast(self.device.type, enabled=False) if self.bf16 else nullcontext()

    def head_weight(self, model) -> Tensor:
        """LM-head weight in the dtype of :meth:`response_hidden` (a differentiable bf16 view under bf16)."""
        weight = lm_head(model)[0]
        return weight.to(torch.bfloat16) if self.bf16 else weight.float()

    def response_hidden(self, body, ro: Rollout) -> Tensor:
        """[B, T, H] hidden states at the positions that predict the response tokens (bf16 under bf16, else fp32)."""
        with self.autocast():
            h = hidden_states(body, ro.input_ids, ro.attention_mask)
        h = h[:, ro.prompt_len - 1: -1]
        return h.to(torch.bfloat16) if self.bf16 else h.float()

    def ref_hidden(self, ro: Rollout) -> Tensor:
        if self.ref is None:  # LoRA: the reference is the same model with its adapters switched off
            with self.policy.disable_adapter():
                return self.response_hidden(self.policy_body, ro)
        return self.response_hidden(self.ref_body, ro)

    def values(self, policy_hidden: Tensor, ro: Rollout) -> Tensor:
        h = policy_hidden if self.critic_body is None else self.response_hidden(self.critic_body, ro)
        with self.fp32():
            return self.critic.values(h)

    # ------------------------------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score(self, ro: Rollout) -> None:
        """Fill ro.logprobs, ro.ref_logprobs, ro.values and ro.kl (per token, zero outside the response)."""
        cfg, temp = self.cfg, self.cfg.generation.temperature
        weight = self.head_weight(self.policy)
        ref_weight = weight if self.ref is None else self.head_weight(self.ref)
        parts = {k: [] for k in ("logprobs", "ref_logprobs", "values", "kl")}
        for idx in _chunks(torch.arange(len(ro)), cfg.ppo.micro_batch_size):
            mb = ro.select(idx)
            labels, mask = mb.labels, mb.response_mask
            h = self.response_hidden(self.policy_body, mb)
            rh = self.ref_hidden(mb)
            with self.fp32():
                lp = self.backend.logprobs(h, weight, labels, temp)
                ref_lp = self.backend.logprobs(rh, ref_weight, labels, temp)
                if cfg.ppo.kl_estimator == "full":
                    kl = self.backend.kl(h, weight, rh, ref_weight, labels, temp)
                else:
                    kl = self.backend.kl_penalty(lp, ref_lp, cfg.ppo.kl_estimator)
            parts["logprobs"].append(lp)
            parts["ref_logprobs"].append(ref_lp)
            parts["values"].append(self.values(h, mb))
            parts["kl"].append(torch.where(mask, kl, 0.0))
        for k, v in parts.items():
            setattr(ro, k, torch.cat(v))

    def sequence_scores(self, ro: Rollout) -> tuple[Tensor, dict[str, float]]:
        """Rewards of the responses, then EOS penalty, clipping and normalisation; raw terms for logging."""
        rcfg = self.cfg.reward
        raw, terms = self.reward_fn(ro.prompts, ro.responses)
        stats = {"reward/mean": raw.mean().item(), "reward/std": raw.std().item() if len(raw) > 1 else 0.0}
        if len(terms) > 1:
            stats |= {f"reward/{k}": v.mean().item() for k, v in terms.items()}
        scores = raw.clone()
        if rcfg.missing_eos_penalty:
            scores = torch.where(ro.no_eos.cpu(), scores - rcfg.missing_eos_penalty, scores)
        if rcfg.clip is not None:
            scores = scores.clamp(-rcfg.clip, rcfg.clip)
        if rcfg.normalize and bool(torch.isfinite(scores).all()):
            self.score_moments.update(scores)
            scores = (scores - self.score_moments.mean) / self.score_moments.std
        ro.extras["raw_scores"] = raw
        return scores.to(self.device), stats

    # ------------------------------------------------------------------------------------------ the loss

    def compute_loss(self, mb: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        """PPO loss of one micro-batch: clipped policy loss (- entropy bonus) + vf_coef * clipped value loss."""
        p = self.cfg.ppo
        weight = self.head_weight(self.policy)
        mask = mb.response_mask
        h = self.response_hidden(self.policy_body, mb)
        with self.fp32():
            pg_loss, stats = self.backend.policy_loss(
                h, weight, mb.labels, mb.logprobs, mb.advantages, mask, clip_eps=p.clip_eps, clip_eps_high=p.clip_eps_high,
                dual_clip=p.dual_clip, entropy_coef=p.entropy_coef, temperature=self.cfg.generation.temperature, loss_agg=p.loss_agg)
        values = self.values(h, mb)
        vf_loss, vstats = ops.ppo_value_loss(values, mb.values, mb.returns, mask, clip_eps=p.vf_clip_eps, loss_agg=p.loss_agg)
        loss = pg_loss + p.vf_coef * vf_loss
        out = {k: stats[k] for k in ("clipfrac", "approx_kl", "ratio_mean", "entropy")}
        out |= {"loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(), "value/clipfrac": vstats["vf_clipfrac"],
                "loss/total": loss.detach()}
        return loss, out

    def _micro_weight(self, micro: Tensor, minibatch: Tensor, mask: Tensor) -> float:
        """Share of the minibatch loss this micro-batch carries, so accumulated gradients equal the minibatch's."""
        if self.cfg.ppo.loss_agg == "token-mean":
            return float(mask[micro].sum() / mask[minibatch].sum().clamp(min=1))
        return len(micro) / len(minibatch)

    def update(self, ro: Rollout) -> dict[str, float]:
        """ppo_epochs x shuffled minibatches; an optimizer step per minibatch, skipped on a non-finite loss/gradient."""
        p = self.cfg.ppo
        params = self.policy_params + self.critic_params
        sums, total_w = {}, 0.0
        grad_norms = []
        mask = ro.response_mask.cpu()  # micro-batch weights index it with CPU permutations: copied once per update
        self.policy.train()
        self.critic.train()
        for _ in range(p.ppo_epochs):
            perm = torch.randperm(len(ro))
            for minibatch in _chunks(perm, p.minibatch_size):
                self.optimizer.zero_grad(set_to_none=True)
                finite = True
                for micro in _chunks(minibatch, p.micro_batch_size):
                    w = self._micro_weight(micro, minibatch, mask)
                    loss, stats = self.compute_loss(ro.select(micro))
                    if not bool(torch.isfinite(loss)):
                        finite = False
                        break
                    (loss * w).backward()
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + w * float(v)
                    total_w += w
                grad_norm = torch.nn.utils.clip_grad_norm_(params, p.max_grad_norm) if finite else torch.tensor(float("nan"))
                if finite and bool(torch.isfinite(grad_norm)):
                    self.optimizer.step()
                    self.scheduler.step()
                    self.global_step += 1
                    grad_norms.append(float(grad_norm))
                else:  # never step on NaN/inf: drop this minibatch's gradient
                    self.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
        self.policy.eval()
        self.critic.eval()
        out = {k: v / max(total_w, 1e-12) for k, v in sums.items()}
        out = {("policy/" + k if "/" not in k else k): v for k, v in out.items()}
        out["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else float("nan")
        return out

    # ------------------------------------------------------------------------------------------ iteration

    def step(self, stop: StopRequest) -> dict[str, float] | None:
        """One PPO iteration; None when a stop was requested before the update (the caller rolls it back)."""
        cfg, p = self.cfg, self.cfg.ppo
        t0 = time.perf_counter()
        prompts = [self.data.train[i] for i in self.sampler.next_batch()]
        ro = generate(self.policy, self.tokenizer, prompts, cfg.generation, self.eos_ids, self.device, self.autocast)
        t_gen = time.perf_counter()
        self.score(ro)
        scores, metrics = self.sequence_scores(ro)
        t_score = time.perf_counter()
        if stop.requested:
            return None
        mask = ro.response_mask
        kl_seq = ro.kl.sum(-1)
        finite = all(bool(torch.isfinite(x[mask]).all()) for x in (ro.logprobs, ro.ref_logprobs, ro.values, ro.kl)) and bool(torch.isfinite(scores).all())
        if finite:
            ro.rewards = token_rewards(scores, ro.kl, mask, self.kl_ctl.value)
            ro.advantages, ro.returns = self.backend.gae(ro.rewards, ro.values, mask, p.gamma, p.lam)
            if p.whiten_advantages and int(mask.sum()) > 1:
                ro.advantages = ops.masked_whiten(ro.advantages, mask)
            metrics |= self.update(ro)
            metrics["value/explained_variance"] = explained_variance(ro.values, ro.returns, mask)
            metrics["value/mean"] = float(ops.masked_mean(ro.values, mask))
        else:  # a NaN/inf reward, log-prob or value: no update from this batch
            self.skipped_updates += 1
            print(f"iteration {self.iteration + 1}: non-finite rewards/log-probs/values, update skipped "
                  f"({self.skipped_updates} so far)", flush=True)
        t_end = time.perf_counter()
        self.kl_ctl.update(float(kl_seq.mean()), len(ro))
        n_tokens = int(mask.sum())
        metrics |= {
            "score/mean": float(scores.mean()),
            "kl": float(kl_seq.mean()),  # KL(pi || pi_ref) per response (sum over tokens), the quantity kl_coef prices
            "kl_per_token": float(ops.masked_mean(ro.kl, mask)),
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
            "throughput/generate_tokens_per_s": n_tokens / max(t_gen - t0, 1e-9),
            "throughput/tokens_per_s": n_tokens / max(t_end - t0, 1e-9),
            "memory/peak_mb": peak_memory_mb(self.device),
        }
        k = self.cfg.num_samples_logged
        self.tracker.log_samples(self.iteration + 1, ro.prompts[:k], ro.responses[:k], ro.extras["raw_scores"][:k].tolist())
        return metrics

    # ------------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward (and exact KL to the reference) on held-out prompts, with the same sampling noise every time."""
        ecfg, cfg = self.cfg.eval, self.cfg
        prompts = self.data.eval[: ecfg.num_prompts] if ecfg.num_prompts else self.data.eval
        if not prompts:
            return {}
        t0 = time.perf_counter()
        weight = self.head_weight(self.policy)
        ref_weight = weight if self.ref is None else self.head_weight(self.ref)
        temp = ecfg.temperature or cfg.generation.temperature
        rewards, kls, lengths, first = [], [], [], None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(ecfg.seed)
            for s in range(0, len(prompts), ecfg.batch_size):
                ro = generate(self.policy, self.tokenizer, prompts[s:s + ecfg.batch_size], cfg.generation, self.eos_ids, self.device,
                              self.autocast, temperature=temp)
                raw, _ = self.reward_fn(ro.prompts, ro.responses)
                rewards.append(raw)
                for idx in _chunks(torch.arange(len(ro)), cfg.ppo.micro_batch_size):
                    mb = ro.select(idx)
                    h, rh = self.response_hidden(self.policy_body, mb), self.ref_hidden(mb)
                    with self.fp32():
                        kls.append(self.backend.kl(h, weight, rh, ref_weight, mb.labels, temp).sum(-1).cpu())
                lengths.append(ro.response_mask.sum(-1).float().cpu())
                first = first or (ro.prompts, ro.responses, raw.tolist())
        r = torch.cat(rewards)
        k = self.cfg.num_samples_logged
        self.tracker.log_samples(self.iteration, first[0][:k], first[1][:k], first[2][:k], tag="eval")
        return {"eval/reward": float(r.mean()), "eval/reward_std": float(r.std()) if len(r) > 1 else 0.0,
                "eval/kl": float(torch.cat(kls).mean()), "eval/response_length": float(torch.cat(lengths).mean()),
                "time/eval": time.perf_counter() - t0}

    # ------------------------------------------------------------------------------------------ the loop

    def train(self) -> dict:
        """Run to ``ppo.iterations``, or until SIGINT/SIGTERM (which checkpoints at the next iteration boundary).

        Returns the last iteration's metrics (with the final evaluation when completed) plus ``status``
        ("completed" | "interrupted") and ``iteration``."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        n_iter, last = cfg.ppo.iterations, {}
        with StopRequest() as stop, tqdm(total=n_iter, initial=self.iteration, desc="ppo", disable=not cfg.progress_bar,
                                         dynamic_ncols=True) as bar:
            if not self.evaluated_initial and self.data.eval:
                initial = self.evaluate()
                self.tracker.log(0, initial)
                bar.write(f"initial eval reward {initial['eval/reward']:.3f}")
            self.evaluated_initial = True
            while self.iteration < n_iter and not stop.requested:
                snapshot = (rng_state(), self.sampler.state_dict())
                metrics = self.step(stop)
                if metrics is None:  # stopped mid-iteration before any weight changed: undo it, so resume redoes it
                    set_rng_state(snapshot[0])
                    self.sampler.load_state_dict(snapshot[1])
                    break
                self.iteration += 1
                it = self.iteration
                if (cfg.eval.every and it % cfg.eval.every == 0) or it == n_iter:
                    metrics |= self.evaluate()
                self.tracker.log(it, metrics)
                last = metrics
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl']:.3f}",
                                **({"eval": f"{metrics['eval/reward']:.3f}"} if "eval/reward" in metrics else {}))
                if it % cfg.save_every == 0 or it == n_iter:
                    self.save()
                for cb in self.callbacks:
                    cb(self, it, metrics)
            status = "completed" if self.iteration >= n_iter else "interrupted"
            if status == "interrupted":
                path = self.save()
                bar.write(f"stopped by {stop.requested}; checkpoint at {path} (resume with --resume {self.run_dir})")
        if status == "completed" and cfg.save_final_model:
            self.save_final_model()
        self.tracker.close()
        return dict(last, status=status, iteration=self.iteration)

    # ------------------------------------------------------------------------------------------ state

    def _trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.policy, "critic": self.critic}

    def _state(self) -> dict:
        return {"global_step": self.global_step, "kl_coef": self.kl_ctl.value, "sampler": self.sampler.state_dict(),
                "score_moments": self.score_moments.state_dict(), "skipped_updates": self.skipped_updates,
                "skipped_steps": self.skipped_steps, "evaluated_initial": self.evaluated_initial}

    def _load_state(self, s: dict) -> None:
        self.iteration, self.global_step = int(s["iteration"]), int(s["global_step"])
        self.kl_ctl.value = float(s["kl_coef"])
        self.sampler.load_state_dict(s["sampler"])
        self.score_moments.load_state_dict(s["score_moments"])
        self.skipped_updates, self.skipped_steps = int(s["skipped_updates"]), int(s["skipped_steps"])
        self.evaluated_initial = bool(s["evaluated_initial"])

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.iteration, self._trainable_modules(), self.optimizer, self.scheduler,
                               self._state(), keep=self.cfg.keep_checkpoints)

    def save_final_model(self) -> Path:
        """The policy as a Hugging Face folder (a LoRA adapter when LoRA is on) plus the tokenizer."""
        out = self.run_dir / "final"
        (self.policy if self.cfg.model.lora.enabled else unwrap(self.policy)).save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return out




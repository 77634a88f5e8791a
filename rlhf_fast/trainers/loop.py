"""The one training loop that every trainer runs: RL (``trainers.ppo``) and the supervised stages (SFT, DPO, RM).

A run is ``total`` units (an RL iteration, or one optimizer step of a supervised stage). After each unit: an
evaluation every ``eval_every`` units and at the end, a row in metrics.jsonl + TensorBoard, a checkpoint every
``save_every`` units and at the end, the callbacks. SIGINT/SIGTERM checkpoints at the next unit boundary; a unit
stopped before it changed any weight (``run_unit`` returned None) is undone (RNG and sampler), so a resume redoes
it exactly. A subclass sets ``cfg``, ``run_dir``, ``device``, ``optimizer``, ``scheduler`` and ``sampler`` and then
calls :meth:`Loop.start`; it provides ``run_unit``, ``evaluate``, ``checkpoint_modules``, ``save_final_model`` and,
for counters of its own, ``extra_state`` / ``load_extra_state``. Its gradient steps go through :meth:`Loop.optimizer_step`.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import StopRequest, resume_latest, rng_state, save_checkpoint, set_rng_state
from ..distributed import World
from ..errors import UserError
from ..tracking import NullTracker, Tracker

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def build_optimizer(groups: list[dict], *, lr: float, adam_betas, adam_eps: float, weight_decay: float, lr_schedule: str,
                    warmup_steps: int, total_steps: int):
    """(AdamW, transformers LR schedule ``lr_schedule`` over ``total_steps`` with ``warmup_steps`` of linear warmup)."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(adam_betas), eps=adam_eps, weight_decay=weight_decay, fused=True)  # CPU and CUDA
    return optimizer, get_scheduler(lr_schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(1, total_steps))


class Loop:
    name = "train"  # progress-bar label and message prefix
    unit = "iteration"  # the key of the unit counter in train()'s result
    callbacks: list = []
    world = World()  # a torchrun launch: set by the subclass (``distributed.setup``) before anything is built

    def start(self, total: int, eval_every: int, resume: str | Path | None) -> None:
        """Counters, the latest checkpoint when resuming (weights, optimizer, RNG, counters), then the tracker."""
        self.total, self.eval_every = total, eval_every
        self.iteration, self.global_step, self.skipped_steps, self.evaluated_initial = 0, 0, 0, False
        resumed = None
        if resume is not None:
            state, ckpt = resume_latest(self.run_dir, self.checkpoint_modules(), self.optimizer, self.scheduler, self.world)
            self.iteration, self.skipped_steps = int(state["iteration"]), int(state["skipped_steps"])
            self.global_step, self.evaluated_initial = int(state.get("global_step", 0)), bool(state["evaluated_initial"])
            self.sampler.load_state_dict(state["sampler"])
            self.load_extra_state(state)
            resumed = self.iteration
            if self.world.main:
                print(f"resumed from {ckpt} ({self.unit} {self.iteration})", flush=True)
        launched = f"world_size: {self.world.size} (torchrun, FSDP2)" if self.world.active else None
        self.tracker = Tracker(self.run_dir, resumed, config=self.cfg, comment=launched) if self.world.main else NullTracker()

    # ------------------------------------------------------------------------------------------ hooks

    def run_unit(self, stop: StopRequest) -> dict[str, float] | None:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def initial_metrics(self) -> dict[str, float]:
        """Logged as row 0, once per run (not again on resume)."""
        return self.evaluate()

    def postfix(self, metrics: dict) -> dict[str, str]:
        return {}

    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def save_final_model(self) -> Path:
        raise NotImplementedError

    def save_model_folder(self, model: torch.nn.Module, tokenizer, lora: bool) -> Path:
        """``model`` as one Hugging Face folder in ``run_dir/final`` (its LoRA adapter when ``lora``) plus the tokenizer;
        every rank calls it: under FSDP2 the weights are gathered and rank 0 writes them."""
        from ..distributed import save_pretrained
        from ..models import unwrap

        out = self.run_dir / "final"
        save_pretrained(model if lora else unwrap(model), out, self.world)
        if self.world.main:
            tokenizer.save_pretrained(out)
        return out

    # ------------------------------------------------------------------------------------------ a gradient step

    def optimizer_step(self, micro_batches: Iterable[tuple[float, Callable[[], tuple[Tensor, dict]]]], params: list[Tensor],
                       max_grad_norm: float) -> tuple[dict[str, float], float, float]:
        """One optimizer step on sum_i w_i loss_i over ``(w_i, closure_i)`` (gradient accumulation), grad-norm clipped.

        A non-finite loss or gradient norm skips the step (counted in ``skipped_steps``): never a step on NaN/inf.
        Across ranks the step is skipped everywhere when any rank's loss is not finite (all ranks take the same path).
        Returns (weighted sums of the micro-batches' stats, the weight they carry, the grad norm or NaN).
        """
        self.optimizer.zero_grad(set_to_none=True)
        sums, total_w, finite = {}, 0.0, True
        for w, closure in micro_batches:
            loss, stats = closure()
            if not self.world.all(bool(torch.isfinite(loss))):
                finite = False
                break
            (loss * w).backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + w * float(v)
            total_w += w
        grad_norm = math.nan
        if finite:
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
        if math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
            self.global_step += 1
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return sums, total_w, grad_norm

    # ------------------------------------------------------------------------------------------ the loop

    def train(self) -> dict:
        """Run to ``total`` units, or until SIGINT/SIGTERM (which checkpoints at the next unit boundary).

        Returns the last unit's metrics (with the final evaluation when completed) plus ``status``
        ("completed" | "interrupted") and the unit counter (``iteration`` or ``step``)."""
        from tqdm.auto import tqdm

        cfg, last = self.cfg, {}
        with StopRequest() as stop, tqdm(total=self.total, initial=self.iteration, desc=self.name,
                                         disable=not (cfg.progress_bar and self.world.main), dynamic_ncols=True) as bar:
            if not self.evaluated_initial:
                initial = self.initial_metrics()
                if initial:
                    self.tracker.log(0, initial)
                self.evaluated_initial = True
            while self.iteration < self.total and self.world.all(not stop.requested):  # a signal on any rank stops all
                snapshot = (rng_state(), self.sampler.state_dict())
                metrics = self.run_unit(stop)
                if metrics is None:  # stopped before any weight changed: undo the unit, so a resume redoes it
                    set_rng_state(snapshot[0])
                    self.sampler.load_state_dict(snapshot[1])
                    break
                self.iteration += 1
                it = self.iteration
                if (self.eval_every and it % self.eval_every == 0) or it == self.total:
                    metrics |= self.evaluate()
                self.tracker.log(it, metrics)
                last = metrics
                bar.update(1)
                bar.set_postfix(self.postfix(metrics))
                if it % cfg.save_every == 0 or it == self.total:
                    self.save()
                for cb in self.callbacks:
                    cb(self, it, metrics)
            status = "completed" if self.iteration >= self.total else "interrupted"
            if status == "interrupted":
                path = self.save()
                if self.world.main:
                    bar.write(f"stopped by {stop.requested or 'a signal'}; checkpoint at {path} (resume with --resume {self.run_dir})")
        if status == "completed" and cfg.save_final_model:
            path = self.save_final_model()  # every rank: under FSDP2 the full weights are gathered for rank 0 to write
            if self.world.main:
                print(f"{self.name}: final model in {path}", flush=True)
        self.tracker.close()
        return dict(last, status=status, **{self.unit: self.iteration})

    def save(self) -> Path:
        state = {"global_step": self.global_step, "skipped_steps": self.skipped_steps, "evaluated_initial": self.evaluated_initial,
                 "sampler": self.sampler.state_dict()} | self.extra_state()
        return save_checkpoint(self.run_dir, self.iteration, self.checkpoint_modules(), self.optimizer, self.scheduler, state,
                               keep=self.cfg.keep_checkpoints, world=self.world)

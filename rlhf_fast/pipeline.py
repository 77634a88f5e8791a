"""The three RLHF stages end to end with AI feedback (RLAIF): ``rlhf-fast pipeline``.

1. pairs:  the policy samples two responses to each of ``num_train_prompts`` training prompts; a judge scores
           them (default VADER sentiment; any ``module:function``); the better one is "chosen" (ties are dropped).
           The same is done on held-out prompts, whose first sample is also the "before" evaluation.
2. rm:     a reward model on the policy's backbone learns the judged pairs (``rlhf_fast.trainers.rm``); its
           held-out accuracy, rank correlation with the judge and calibration are measured on the held-out pairs.
3. ppo:    the PPO trainer optimises the learned reward model. The judge rides along with weight 0: it never
           shapes the policy, but it is logged on every rollout, so the learned reward and the judge score can
           be compared over training. Both are put in units of their spread on the initial policy's held-out
           samples (z-scores); the gap z(reward model) - z(judge) growing is reward hacking: the policy finds
           what the reward model over-rates.
4. eval:   the trained policy answers the held-out prompts with the same sampling noise as before training;
           the judge (which neither the reward model nor PPO saw on these prompts) scores before and after.

Outputs in ``output_dir``: pairs_train.jsonl / pairs_eval.jsonl (standard preference rows, reusable by
``rlhf-fast rm`` and ``rlhf-fast dpo``), rm/ and ppo/ run directories, summary.json, curves.png.
With ``--resume RUN_DIR`` finished stages are reused and PPO continues from its last checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import Config, RewardSource, resume_config_path, save_config
from .data import EVAL_SPLITS, load_prompts, read_rows
from .errors import UserError
from .trainers.rm import RMConfig
from .trainers.stage import load_stage_config, resolve_device, seed_everything


def _ppo_defaults() -> Config:
    """PPO settings sized for the default demonstration on a 2-core CPU (SmolLM2-135M, ~10 minutes)."""
    c = Config()
    c.ppo.iterations, c.ppo.batch_size, c.ppo.minibatch_size, c.ppo.micro_batch_size = 20, 16, 8, 8
    c.ppo.lr, c.ppo.kl_coef, c.ppo.ppo_epochs = 3e-5, 0.05, 1
    c.critic.share_backbone = True  # the value head sits on the policy: no second 135M backbone to run
    c.reward.normalize = True  # the learned reward has an arbitrary scale: whiten it so kl_coef means the same
    c.generation.max_new_tokens = 32
    c.data.max_prompt_length = 96
    c.save_every, c.num_samples_logged = 100, 4
    return c


def _rm_defaults() -> RMConfig:
    """A linear probe on the frozen backbone: features once, then cheap head steps (on a CPU, fine-tuning even the top
    layers learns less from a few hundred pairs in the same minutes). Few epochs: a probe on 576 features overfits
    a few hundred pairs (and grows over-confident) when trained to zero loss."""
    c = RMConfig()
    c.model.train_layers = 0
    c.train.epochs, c.train.batch_size, c.train.micro_batch_size = 20.0, 32, 32
    c.train.lr, c.train.weight_decay, c.train.lr_schedule = 3e-3, 0.01, "cosine"
    c.train.eval_every, c.train.eval_batch_size = 0, 16
    c.save_every = 100000  # a probe trains in seconds: only the final model is worth writing
    return c


@dataclass
class PipelineConfig:
    output_dir: str = "runs/pipeline"
    seed: int = 0
    device: str = "auto"
    threads: int | None = 1  # generation's small matmuls scale badly over 2 busy cores; null: torch's default
    progress_bar: bool = True
    policy: str = "smollm2"  # the policy, and the reward model's backbone
    judge: str = "vader"  # "vader" | "module:function" (prompts, responses) -> scores
    prompt_file: str = "builtin:everyday_prompts"  # rows with split=eval (or a seeded eval_fraction) are held out
    eval_fraction: float = 0.2  # used when the prompt file has no split column
    num_train_prompts: int | None = None  # prompts that get a judged pair for the reward model (null: all)
    num_eval_prompts: int | None = None  # held-out prompts for the evaluation (null: all)
    sample_batch_size: int = 32  # responses per generate call while sampling pairs
    eval_seed: int = 1234  # sampling noise of the before/after evaluation (the same both times)
    rm: RMConfig = field(default_factory=_rm_defaults)  # the pipeline sets rm.output_dir, model.backbone, data files
    ppo: Config = field(default_factory=_ppo_defaults)  # the pipeline sets ppo.output_dir, model.policy, reward, data

    def validate(self) -> "PipelineConfig":
        for key, v, least in (("num_train_prompts", self.num_train_prompts, 2), ("num_eval_prompts", self.num_eval_prompts, 2),
                              ("sample_batch_size", self.sample_batch_size, 1)):
            if v is not None and v < least:
                raise UserError(f"{key}: must be >= {least}, got {v}")
        if not 0 < self.eval_fraction < 1:
            raise UserError(f"eval_fraction: must be in (0, 1), got {self.eval_fraction}")
        self._wire()
        self.rm.validate()
        self.ppo.validate()
        return self

    def _wire(self) -> None:
        """Point the embedded stage configs at this run (these keys are the pipeline's, whatever the YAML says)."""
        out = Path(self.output_dir)
        for c in (self.rm, self.ppo):
            c.seed, c.device, c.threads, c.progress_bar = self.seed, self.device, self.threads, self.progress_bar
        self.rm.output_dir = str(out / "rm")
        self.rm.model.backbone = self.policy
        self.rm.data.train_file, self.rm.data.eval_file = str(out / "pairs_train.jsonl"), str(out / "pairs_eval.jsonl")
        self.rm.data.skip_invalid = False
        self.ppo.output_dir = str(out / "ppo")
        self.ppo.model.policy = self.policy
        self.ppo.reward.sources = [RewardSource(str(out / "rm" / "final"), 1.0), RewardSource(self.judge, 0.0)]
        self.ppo.data.prompt_file, self.ppo.data.eval_fraction = str(out / "prompts_train.jsonl"), 0.0
        self.ppo.save_final_model = True


# ----------------------------------------------------------------------------------------------- helpers


def split_prompt_rows(spec: str, eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of a prompt file: its split column when it has eval rows, else a seeded fraction."""
    rows = read_rows(spec)
    if not rows:
        raise UserError(f"prompt_file: {spec!r} holds no prompts")
    is_eval = [str(r.get("split", "")).lower() in EVAL_SPLITS for r in rows]
    if not any(is_eval):
        order = np.random.default_rng(seed).permutation(len(rows))
        held = set(order[: max(1, int(len(rows) * eval_fraction))].tolist())
        is_eval = [i in held for i in range(len(rows))]
    strip = lambda r: {k: v for k, v in r.items() if k != "split"}  # noqa: E731
    return [strip(r) for r, e in zip(rows, is_eval) if not e], [strip(r) for r, e in zip(rows, is_eval) if e]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)  # a stage's output appears whole or not at all


def judged_pairs(prompts: list[str], a: list[str], b: list[str], sa: list[float], sb: list[float]) -> tuple[list[dict], dict]:
    """Preference rows from two judged samples per prompt; ties and empty responses are dropped (and counted)."""
    rows, ties, empty = [], 0, 0
    for p, x, y, fx, fy in zip(prompts, a, b, sa, sb):
        if not x.strip() or not y.strip():
            empty += 1
        elif fx == fy or x == y:
            ties += 1
        else:
            (c, fc), (r, fr) = sorted([(x, fx), (y, fy)], key=lambda t: -t[1])
            rows.append({"prompt": p, "chosen": c, "rejected": r, "score_chosen": fc, "score_rejected": fr})
    return rows, {"pairs": len(rows), "ties_dropped": ties, "empty_dropped": empty}


def _z(x: float, mean: float, std: float) -> float:
    return (x - mean) / std if std > 0 else float("nan")


# ----------------------------------------------------------------------------------------------- pipeline


class Pipeline:
    def __init__(self, config: PipelineConfig, resume: str | Path | None = None):
        self.cfg = cfg = config.validate()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("rlhf-fast pipeline under torchrun is not supported yet: launch its stages (sft, rm, ppo) one by one")
        if resume is not None and Path(resume).resolve() != Path(cfg.output_dir).resolve():
            raise UserError(f"--resume {resume!r}: the run's config has output_dir {cfg.output_dir!r}")
        self.resume = resume is not None
        self.out = Path(cfg.output_dir)
        self.device = resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out / "config.yaml")
        self.summary_path = self.out / "summary.json"
        self.summary: dict = json.loads(self.summary_path.read_text()) if self.resume and self.summary_path.is_file() else {}

    @classmethod
    def from_cli(cls, config_path: str | None, overrides: list[str], resume: str | None) -> "Pipeline":
        return cls(load_stage_config(PipelineConfig, resume_config_path(config_path, resume, "pipeline run"), overrides),
                   resume=resume)

    def _save_summary(self) -> None:
        self.summary_path.write_text(json.dumps(self.summary, indent=1))

    def _log(self, msg: str) -> None:
        print(f"[pipeline] {msg}", flush=True)

    # -------------------------------------------------------------------------------------- stage 1

    @torch.no_grad()
    def sample(self, policy, tokenizer, prompts, seed: int, batch_size: int, autocast=None) -> list[str]:
        """Responses to ``prompts``; ``autocast``: the context ``policy`` runs in (the PPO trainer's, for its policy)."""
        from .models import eos_ids
        from .rollout import generate

        torch.manual_seed(seed)
        out = []
        eos = eos_ids(tokenizer, policy, "policy")
        for s in range(0, len(prompts), batch_size):
            ro = generate(policy, tokenizer, prompts[s:s + batch_size], self.cfg.ppo.generation, eos, self.device,
                          autocast or _no_autocast, packed=self.cfg.ppo.generation.packed_weights)
            out += ro.responses
        return out

    def stage_pairs(self) -> None:
        cfg = self.cfg
        done = all((self.out / f).is_file() for f in ("pairs_train.jsonl", "pairs_eval.jsonl", "prompts_train.jsonl", "before.json"))
        if self.resume and done:
            self._log("pairs: reusing the judged pairs of the previous run")
            return
        from .models import attn_implementation, load_causal_lm, load_tokenizer, resolve_model_path
        from .rewards import load_reward

        t0 = time.perf_counter()
        seed_everything(cfg.seed)
        train_rows, eval_rows = split_prompt_rows(cfg.prompt_file, cfg.eval_fraction, cfg.seed)
        write_jsonl(self.out / "prompts_train.jsonl", train_rows)
        write_jsonl(self.out / "prompts_eval.jsonl", eval_rows)
        path = resolve_model_path(cfg.policy, "policy")
        tokenizer = load_tokenizer(path)
        attn = attn_implementation(cfg.ppo.model.attn_implementation, self.device, False)  # sampled without autocast
        policy = load_causal_lm(path, attn, self.device, "policy").eval()
        ctx = getattr(policy.config, "max_position_embeddings", None)
        d = cfg.ppo.data
        train = load_prompts(_prompt_cfg(d, self.out / "prompts_train.jsonl"), tokenizer, cfg.ppo.generation.max_new_tokens, ctx).train
        held = load_prompts(_prompt_cfg(d, self.out / "prompts_eval.jsonl"), tokenizer, cfg.ppo.generation.max_new_tokens, ctx).train
        rng = np.random.default_rng(cfg.seed)
        if cfg.num_train_prompts and cfg.num_train_prompts < len(train):
            train = [train[i] for i in sorted(rng.choice(len(train), cfg.num_train_prompts, replace=False))]
        held = held[: cfg.num_eval_prompts] if cfg.num_eval_prompts else held
        judge = load_reward(cfg.judge, self.device)
        bs = cfg.sample_batch_size
        self._log(f"pairs: sampling 2 responses to {len(train)} train and {len(held)} held-out prompts")
        twice = [p for p in train for _ in range(2)]  # both samples of a prompt in one batch: one prompt encoding
        resp = self.sample(policy, tokenizer, twice, cfg.seed + 1, bs)
        texts = [p.text for p in train]
        scores = [float(x) for x in judge([p.text for p in twice], resp)]
        rows, stats = judged_pairs(texts, resp[0::2], resp[1::2], scores[0::2], scores[1::2])
        before = self.sample(policy, tokenizer, held, cfg.eval_seed, bs)  # the "before" sample; the after one uses this seed too
        other = self.sample(policy, tokenizer, held, cfg.eval_seed + 1, bs)
        htexts = [p.text for p in held]
        s_before, s_other = [float(x) for x in judge(htexts, before)], [float(x) for x in judge(htexts, other)]
        eval_rows_pairs, eval_stats = judged_pairs(htexts, before, other, s_before, s_other)
        if len(rows) < 4 or len(eval_rows_pairs) < 2:
            raise UserError(f"pairs: only {len(rows)} train / {len(eval_rows_pairs)} held-out pairs had a judge preference "
                            "(the rest tied); use more prompts or a judge that separates responses")
        write_jsonl(self.out / "pairs_train.jsonl", rows)
        write_jsonl(self.out / "pairs_eval.jsonl", eval_rows_pairs)
        (self.out / "before.json").write_text(json.dumps({"prompts": htexts, "responses": before, "judge": s_before,
                                                           "other_responses": other, "other_judge": s_other}))
        self.summary["pairs"] = {"train": stats, "eval": eval_stats, "train_prompts": len(train), "eval_prompts": len(held),
                                 "judge_mean_of_samples": float(np.mean(scores)), "seconds": time.perf_counter() - t0}
        self._save_summary()
        self._log(f"pairs: {stats['pairs']} train pairs ({stats['ties_dropped']} ties dropped), {eval_stats['pairs']} held-out pairs "
                  f"in {time.perf_counter() - t0:.0f}s")

    # -------------------------------------------------------------------------------------- stage 2

    def stage_rm(self) -> None:
        from .trainers.rm import RewardModelTrainer, evaluate_folder

        final = self.out / "rm" / "final"
        if self.resume and (final / "config.json").is_file() and "rm" in self.summary:
            self._log("rm: reusing the trained reward model")
            return
        t0 = time.perf_counter()
        self._log("rm: training the reward model on the judged pairs")
        RewardModelTrainer(self.cfg.rm).train()
        # Held-out metrics of the saved folder, as PPO will read it (the judge's scores are the ratings).
        metrics = evaluate_folder(str(final), str(self.out / "pairs_eval.jsonl"), self.out / "rm_eval", device=self.cfg.device,
                                  batch_size=self.cfg.rm.train.eval_batch_size)
        self.summary["rm"] = {"heldout": metrics, "seconds": time.perf_counter() - t0}
        self._save_summary()
        self._log(f"rm: held-out accuracy {metrics['accuracy']:.3f}, Spearman with the judge {metrics['spearman_global']:.3f}, "
                  f"ECE {metrics['ece']:.3f} ({time.perf_counter() - t0:.0f}s)")

    # -------------------------------------------------------------------------------------- stage 3

    def stage_ppo(self):
        from .tracking import read_metrics
        from .trainers.ppo import RLTrainer

        ppo_dir = Path(self.cfg.ppo.output_dir)
        rows = read_metrics(ppo_dir)
        finished = (ppo_dir / "final").is_dir() and rows and rows[-1].get("iteration") == self.cfg.ppo.ppo.iterations
        if self.resume and finished and "ppo" in self.summary:
            self._log("ppo: reusing the finished PPO run")
            return None
        t0 = time.perf_counter()
        resume = ppo_dir if self.resume and (ppo_dir / "checkpoints").is_dir() else None
        self._log(f"ppo: {self.cfg.ppo.ppo.iterations} iterations against the learned reward (the judge logged with weight 0)")
        trainer = RLTrainer(self.cfg.ppo, resume=resume)
        result = trainer.train()
        self.summary["ppo"] = {"status": result["status"], "iterations": result["iteration"], "reward_names": trainer.reward_fn.names,
                               "seconds": time.perf_counter() - t0 + self.summary.get("ppo", {}).get("seconds", 0.0)}
        self._save_summary()
        if result["status"] != "completed":
            raise KeyboardInterrupt  # the PPO checkpoint is saved: --resume continues from it
        return trainer

    # -------------------------------------------------------------------------------------- stage 4

    def stage_eval(self, trainer) -> None:
        from .models import load_causal_lm, load_tokenizer
        from .rewards import RewardModel, load_reward

        t0 = time.perf_counter()
        cfg = self.cfg
        before = json.loads((self.out / "before.json").read_text())
        autocast = None
        if trainer is not None:  # its policy may use flash-attn, which needs the trainer's bf16 autocast
            policy, tokenizer, autocast = trainer.policy, trainer.tokenizer, trainer.autocast
        else:
            path = str(Path(cfg.ppo.output_dir) / "final")
            tokenizer = load_tokenizer(path)
            if (Path(path) / "adapter_config.json").is_file():  # a LoRA run saves its adapter only
                from peft import AutoPeftModelForCausalLM

                policy = AutoPeftModelForCausalLM.from_pretrained(path).to(self.device).eval()
            else:
                policy = load_causal_lm(path, "sdpa", self.device, "ppo/final").eval()
        held = load_prompts(_prompt_cfg(cfg.ppo.data, self.out / "prompts_eval.jsonl"), tokenizer, cfg.ppo.generation.max_new_tokens,
                            None).train
        held = held[: len(before["prompts"])]
        after = self.sample(policy, tokenizer, held, cfg.eval_seed, cfg.sample_batch_size, autocast)
        judge = load_reward(cfg.judge, self.device)
        rm = RewardModel(str(self.out / "rm" / "final"), self.device, cfg.rm.train.eval_batch_size)
        prompts = before["prompts"]
        j_after = [float(x) for x in judge(prompts, after)]
        r_before, r_after = rm(prompts, before["responses"]), rm(prompts, after)
        r_other = rm(prompts, before["other_responses"])
        # Units for the gap: the spread of each score over the initial policy's held-out samples.
        base_j = np.asarray(before["judge"] + before["other_judge"])
        base_r = np.asarray(r_before + r_other)
        units = {"judge_mean": float(base_j.mean()), "judge_std": float(base_j.std()),
                 "rm_mean": float(base_r.mean()), "rm_std": float(base_r.std())}
        heldout = {
            "judge_before": float(np.mean(before["judge"])), "judge_after": float(np.mean(j_after)),
            "judge_before_std": float(np.std(before["judge"])), "judge_after_std": float(np.std(j_after)),
            "judge_win_rate": float(np.mean(np.sign(np.asarray(j_after) - np.asarray(before["judge"])) * 0.5 + 0.5)),
            "rm_before": float(np.mean(r_before)), "rm_after": float(np.mean(r_after)),
        }
        for when in ("before", "after"):
            heldout[f"gap_{when}"] = (_z(heldout[f"rm_{when}"], units["rm_mean"], units["rm_std"])
                                      - _z(heldout[f"judge_{when}"], units["judge_mean"], units["judge_std"]))
        self.summary["eval"] = {"heldout": heldout, "units": units, "prompts": len(prompts), "seconds": time.perf_counter() - t0}
        self.summary["curve"] = self.training_curve(units)
        self._save_summary()
        with open(self.out / "after.jsonl", "w") as f:
            for p, b, jb, a, ja in zip(prompts, before["responses"], before["judge"], after, j_after):
                f.write(json.dumps({"prompt": p, "before": b, "judge_before": jb, "after": a, "judge_after": ja}) + "\n")
        self._log(f"eval: held-out judge score {heldout['judge_before']:.3f} -> {heldout['judge_after']:.3f}; "
                  f"learned reward {heldout['rm_before']:.3f} -> {heldout['rm_after']:.3f}")

    def training_curve(self, units: dict) -> dict:
        """Per PPO iteration: learned reward and judge score of the rollouts, in raw and z units, and their gap."""
        from .tracking import read_metrics

        rm_name, judge_name = self.summary["ppo"]["reward_names"]
        curve = {k: [] for k in ("iteration", "rm", "judge", "rm_z", "judge_z", "gap", "kl")}
        for r in read_metrics(self.cfg.ppo.output_dir):
            rm_v, j_v = r.get(f"reward/{rm_name}"), r.get(f"reward/{judge_name}")
            if not isinstance(rm_v, (int, float)) or not isinstance(j_v, (int, float)):
                continue
            rz, jz = _z(rm_v, units["rm_mean"], units["rm_std"]), _z(j_v, units["judge_mean"], units["judge_std"])
            for k, v in (("iteration", r["iteration"]), ("rm", rm_v), ("judge", j_v), ("rm_z", rz), ("judge_z", jz), ("gap", rz - jz),
                         ("kl", r.get("kl", float("nan")))):
                curve[k].append(v)
        return curve

    # -------------------------------------------------------------------------------------- all

    def train(self) -> dict:
        t0 = time.perf_counter()
        try:
            self.stage_pairs()
            self.stage_rm()
            trainer = self.stage_ppo()
        except KeyboardInterrupt:
            self._log(f"interrupted; continue with: rlhf-fast pipeline --resume {self.out}")
            return {"status": "interrupted"}
        self.stage_eval(trainer)
        self.summary["seconds_total_this_call"] = time.perf_counter() - t0
        self.summary["threads"] = torch.get_num_threads()
        self._save_summary()
        png = plot_pipeline(self.summary, self.out / "curves.png")
        self._log(f"done in {time.perf_counter() - t0:.0f}s: {self.summary_path}, {png}")
        return {"status": "completed", **self.summary["eval"]["heldout"]}


def _prompt_cfg(data_cfg, path: Path):
    """The PPO data section, pointed at one of the pipeline's prompt files, with nothing held out."""
    import copy

    d = copy.copy(data_cfg)
    d.prompt_file, d.eval_fraction = str(path), 0.0
    return d


def _no_autocast():
    from contextlib import nullcontext

    return nullcontext()


def plot_pipeline(summary: dict, out: Path) -> Path:
    """Four panels: learned reward vs judge over PPO (z units), their gap, KL, and the held-out before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, h = summary["curve"], summary["eval"]["heldout"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    ax = axes[0]
    ax.plot(c["iteration"], c["rm_z"], "o-", ms=3, label="learned reward (reward model)")
    ax.plot(c["iteration"], c["judge_z"], "s-", ms=3, label="judge score (never trained on)")
    ax.set_title("PPO rollouts: reward vs judge (z units)")
    ax.set_xlabel("PPO iteration")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(c["iteration"], c["gap"], "o-", ms=3, color="C3")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_title("gap z(reward model) - z(judge)\n(growth = reward hacking)", fontsize=10)
    ax.set_xlabel("PPO iteration")
    ax = axes[2]
    ax.plot(c["iteration"], c["kl"], "o-", ms=3, color="C2")
    ax.set_title("KL(policy || reference) per response (nats)")
    ax.set_xlabel("PPO iteration")
    ax = axes[3]
    vals = [h["judge_before"], h["judge_after"]]
    errs = [h["judge_before_std"], h["judge_after_std"]]
    n = summary["eval"]["prompts"]
    ax.bar(["before PPO", "after PPO"], vals, yerr=[e / math.sqrt(max(n, 1)) for e in errs], color=["C7", "C0"], capsize=4)
    acc = summary["rm"]["heldout"]["accuracy"]
    ax.set_title(f"held-out judge score ({n} prompts, ±s.e.)\nreward-model held-out accuracy {acc:.2f}", fontsize=10)
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

"""TRL 1.16's GRPOTrainer on SmolLM2-135M-Instruct (fp32, CPU): the training step's loss, three LM-head paths.

Modes, each in its own subprocess (peak RSS is per process), launched interleaved (a b c a b c ...):

- ``trl``: plain TRL 1.16. Its GRPOTrainer always gives the model its chunked fused LM head
  (``trl.trainer.utils.add_fused_lm_head``; no flag turns it on or off). Off CUDA/XPU that head scores every
  position, prompt included (``trl/kernels/chunked_logprob.py: _use_triton``), in [tokens x 32768] vocab tiles;
- ``rlhf_fast``: ``rlhf_fast_trl()``: rlhf_fast's head computes the log-probs / entropies, TRL's loss on top;
- ``rlhf_fast_fused_loss``: ``rlhf_fast_trl(fused_loss=True)``: the clipped loss from one ``linear_ppo_loss``.

Generation is the same in every mode and would swamp the figure on CPU, so the step is fed a fixed batch shaped
as ``GRPOTrainer._generate_and_score_completions`` returns it (default config: loss "dapo", on-policy, beta 0):
``num_completions`` completions of ``completion_len`` random tokens (two rows end early at an EOS, masked after
it as TRL masks) after ~``prompt_len``-token prompts (one left-padded), group-normalised advantages. Timed per
step: ``trainer.compute_loss`` + ``backward`` ("loss fwd+bwd"), then grad clipping + AdamW step ("step").
Memory, per step: the peak RSS (``ru_maxrss``) during loss fwd+bwd minus the RSS just before it, with the model, its
gradients and AdamW's state allocated, glibc's free memory trimmed and the high-water mark reset
(``/proc/self/clear_refs``): the loss's own activations and head temporaries. (Without that reset, ``ru_maxrss``
is monotonic and the AdamW step's temporaries would hide part of it; the process-wide figure is kept too.)

  python benchmarks/bench_trl_grpo.py                                 # the full measurement (JSON + table)
  python benchmarks/bench_trl_grpo.py --completion-len 32 --steps 1 --rounds 1 --out /tmp/smoke.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("trl", "rlhf_fast", "rlhf_fast_fused_loss")
# grad norms of the first step (same weights, same batch in every mode) must agree to fp32 accuracy; later steps
# follow AdamW updates whose rounding differs per mode, so they are only reported
GRAD_RTOL = 1e-4


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak() -> bool:
    """Trim glibc's free heap and reset the high-water RSS (ru_maxrss) to the current RSS; False if refused."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def make_inputs(tok, vocab: int, args, seed: int = 0) -> dict:
    """The dict GRPOTrainer._compute_loss consumes (``_generate_and_score_completions``'s output, on-policy, beta 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    b, p, c = args.num_completions, args.prompt_len, args.completion_len
    special = set(tok.all_special_ids)
    lo = max(special) + 1 if max(special) < 1000 else 0  # SmolLM2's special tokens are the first ids
    prompt_ids = torch.randint(lo, vocab, (b, p), generator=g)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_ids[-1, :4], prompt_mask[-1, :4] = tok.pad_token_id, 0  # a shorter prompt, left-padded
    completion_ids = torch.randint(lo, vocab, (b, c), generator=g)
    # rows 1 and 2 stop early at an EOS; TRL masks everything after the first EOS and pads it
    lengths = torch.tensor([c if i % 3 == 0 else max(1, c - c // 4 * (i % 3)) for i in range(b)])
    completion_mask = (torch.arange(c) < lengths.unsqueeze(1)).int()
    for i, n in enumerate(lengths.tolist()):
        if n < c:
            completion_ids[i, n - 1] = tok.eos_token_id
            completion_ids[i, n:] = tok.pad_token_id
    rewards = torch.rand(b, generator=g)
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)  # one group: TRL's scale_rewards="group"
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": advantages,
            "num_items_in_batch": completion_mask.sum().float()}


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_fast.integrations import trl as rt
    from rlhf_fast.models import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = GRPOConfig(output_dir=args.tmp, per_device_train_batch_size=args.num_completions,
                     num_generations=args.num_completions, max_completion_length=args.completion_len, use_cpu=True,
                     bf16=False, report_to=[], save_strategy="no", disable_tqdm=True, learning_rate=1e-6, seed=0)
    ds = Dataset.from_dict({"prompt": ["Tell me a story."] * args.num_completions})
    ctx = rt.rlhf_fast_trl(fused_loss=args.worker == "rlhf_fast_fused_loss") if args.worker != "trl" else None
    if ctx is not None:
        ctx.__enter__()
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=cfg,
                          train_dataset=ds, processing_class=tok)
    head = "rlhf_fast" if getattr(model.forward, "_rlhf_fast_fused", False) else "trl"
    assert head == ("trl" if args.worker == "trl" else "rlhf_fast"), (args.worker, head)
    if args.worker == "rlhf_fast_fused_loss":
        assert rt.grpo_fused_loss_unsupported(trainer) is None, rt.grpo_fused_loss_unsupported(trainer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not run here
    inputs = make_inputs(tok, model.config.vocab_size, args)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
    # allocate gradients and AdamW's state (a no-op step, lr 0) so that the baseline holds them
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    opt.param_groups[0]["lr"] = cfg.learning_rate
    base_max, base_rss = _maxrss_mb(), _rss_mb()

    steps = []
    for i in range(args.warmup + args.steps):
        opt.zero_grad(set_to_none=False)  # the gradients stay allocated: not counted in the loss's memory
        reset = _reset_peak()
        rss0 = _rss_mb() if reset else base_max
        t0 = time.perf_counter()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        t1 = time.perf_counter()
        peak = _maxrss_mb() - rss0
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        t2 = time.perf_counter()
        steps.append({"warmup": i < args.warmup, "loss_fwd_bwd_s": t1 - t0, "step_s": t2 - t0, "loss": loss.item(),
                      "grad_norm": grad_norm.item(), "entropy": trainer._metrics["train"]["entropy"][-1],
                      "rss_before_mb": rss0, "loss_peak_rss_increase_mb": peak, "peak_reset": reset})
        del loss
    if ctx is not None:
        ctx.__exit__(None, None, None)
    return {"mode": args.worker, "head": head, "baseline_maxrss_mb": base_max, "baseline_rss_mb": base_rss,
            "threads": torch.get_num_threads(), "steps": steps}


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(args) -> dict:
    import torch
    import transformers
    import trl

    cpu = next((line.split(":", 1)[1].strip() for line in _run(["lscpu"]).splitlines() if line.startswith("Model name")),
               platform.processor())
    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "python": platform.python_version(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "threads": args.threads or torch.get_num_threads(),
            "git_commit": _run(["git", "-C", str(HERE.parent), "rev-parse", "HEAD"]),
            "git_dirty": bool(_run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--untracked-files=no"]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--completion-len", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--num-completions", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds: one run of every mode each")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_trl_grpo_smollm2_cpu.json"))
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="/tmp/bench_trl_grpo", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return 0

    runs = []
    base = [sys.executable, __file__] + [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                                          ("completion_len", "prompt_len", "num_completions", "steps", "warmup", "threads")]
    for r in range(args.rounds):
        for mode in MODES:
            load_before = _loadavg()
            proc = subprocess.run(base + [f"--worker={mode}"], check=False, capture_output=True, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                raise SystemExit(f"{mode} (round {r}) failed with exit status {proc.returncode}")
            run = json.loads(lines[-1][len("RESULT "):]) | {"round": r, "loadavg_before": load_before,
                                                             "loadavg_after": _loadavg()}
            runs.append(run)
            timed = [s for s in run["steps"] if not s["warmup"]]
            t = statistics.median(s["loss_fwd_bwd_s"] for s in timed)
            m = statistics.median(s["loss_peak_rss_increase_mb"] for s in timed)
            print(f"round {r} {mode:22s} loss fwd+bwd {t:7.3f} s  peak RSS +{m:7.1f} MB  load {run['loadavg_after']}",
                  flush=True)

    # the first step runs on the same weights and batch in every mode: same loss, grad norm and entropy
    first = {m: [r["steps"][0] for r in runs if r["mode"] == m] for m in MODES}
    ref = first["trl"][0]
    for m, ss in first.items():
        for s in ss:
            for k in ("loss", "grad_norm", "entropy"):
                assert abs(s[k] - ref[k]) <= GRAD_RTOL * max(1e-3, abs(ref[k])), (m, k, s[k], ref[k])

    summary = {}
    for m in MODES:
        mine = [r for r in runs if r["mode"] == m]
        timed = [s for r in mine for s in r["steps"] if not s["warmup"]]
        summary[m] = {"loss_fwd_bwd_s": statistics.median(s["loss_fwd_bwd_s"] for s in timed),
                      "step_s": statistics.median(s["step_s"] for s in timed),
                      "peak_rss_increase_mb": statistics.median(s["loss_peak_rss_increase_mb"] for s in timed),
                      "peak_rss_increase_mb_max": max(s["loss_peak_rss_increase_mb"] for s in timed),
                      "peak_reset": all(s["peak_reset"] for s in timed),
                      "first_step": {k: first[m][0][k] for k in ("loss", "grad_norm", "entropy")}}
    for m in MODES:
        summary[m]["time_ratio_to_trl"] = summary[m]["loss_fwd_bwd_s"] / summary["trl"]["loss_fwd_bwd_s"]
        summary[m]["rss_ratio_to_trl"] = summary[m]["peak_rss_increase_mb"] / max(summary["trl"]["peak_rss_increase_mb"], 1e-9)

    result = {"benchmark": "TRL GRPOTrainer loss step, SmolLM2-135M-Instruct fp32, CPU",
              "shapes": {"num_completions": args.num_completions, "prompt_len": args.prompt_len,
                         "completion_len": args.completion_len, "vocab": 49152, "hidden": 576},
              "protocol": {"warmup": args.warmup, "timed_steps_per_run": args.steps, "rounds": args.rounds,
                           "order": "interleaved, one subprocess per run", "loss_type": "dapo (TRL default), on-policy",
                           "timing": "median over all timed steps of a mode",
                           "memory": "median over timed steps of the ru_maxrss increase during loss fwd+bwd over the "
                           "RSS before it (params, grads, AdamW state allocated; malloc_trim + clear_refs reset)"},
              "environment": environment(args), "summary": summary, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"\n{args.num_completions} x ({args.prompt_len} + {args.completion_len}) tokens, threads "
          f"{result['environment']['threads']}, load avg {runs[0]['loadavg_before']} .. {runs[-1]['loadavg_after']}\n")
    print("| mode | loss fwd+bwd s | ratio to TRL | step s (+ AdamW) | peak RSS increase MB | ratio |")
    print("|---|---|---|---|---|---|")
    for m in MODES:
        s = summary[m]
        print(f"| {m} | {s['loss_fwd_bwd_s']:.3f} | {s['time_ratio_to_trl']:.2f} | {s['step_s']:.3f} | "
              f"{s['peak_rss_increase_mb']:.0f} | {s['rss_ratio_to_trl']:.2f} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

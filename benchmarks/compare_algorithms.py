"""Every RL algorithm on the demo task, one after another, and the README's table and plot from their runs.

    python benchmarks/compare_algorithms.py run [ppo grpo ...]   # configs/<name>_smollm2_sentiment.yaml -> runs/compare/<name>
    python benchmarks/compare_algorithms.py run --nproc 2 ppo    # the same under torchrun, 2 ranks (FSDP2, gloo on CPU)
    python benchmarks/compare_algorithms.py report               # table (stdout) + algorithms.png from the committed results

``run`` times each whole command (model load and evaluations included), notes ``uptime``'s load before and after
(the machine may be shared), and copies the run's config.yaml and metrics.jsonl with a summary.json into
benchmarks/results/<name>_smollm2_sentiment/. ``report`` reads only those committed files.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ALGORITHMS = {  # name -> label in the table and plot
    "ppo": "PPO (GAE, shared critic)",
    "grpo": "GRPO (k3 KL in the loss)",
    "rloo": "RLOO",
    "reinforce": "REINFORCE (batch-mean baseline)",
    "reinforce_pp": "REINFORCE++",
    "remax": "ReMax (greedy baseline)",
    "trpo": "TRPO (GRPO advantages)",
}


def _load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(names: list[str], nproc: int = 1) -> None:
    """``nproc`` > 1: launched by torchrun, one rank per process on this machine (results in <name>_..._torchrun<N>/)."""
    exe = Path(sys.executable).with_name("rlhf-fast")
    for name in names:
        tag = f"{name}_smollm2_sentiment" + (f"_torchrun{nproc}" if nproc > 1 else "")
        out = ROOT / "runs" / "compare" / tag
        shutil.rmtree(out, ignore_errors=True)
        launch = [str(exe)] if nproc == 1 else [str(exe.with_name("torchrun")), f"--nproc_per_node={nproc}", "-m", "rlhf_fast.cli"]
        # under torchrun: one intra-op thread per rank, and a rank's share of a minibatch as its micro-batch
        extra = [] if nproc == 1 else ["--threads=1", f"--ppo.micro_batch_size={_minibatch(name) // nproc}"]
        cmd = launch + ["rl", "--config", f"configs/{name}_smollm2_sentiment.yaml", f"--output_dir={out}",
                        "--progress_bar=false", "--save_final_model=false"] + extra
        load_before, t0 = _load(), time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        wall, load_after = time.perf_counter() - t0, _load()
        rows = _metrics(out / "metrics.jsonl")
        evals = [r for r in rows if "eval/reward" in r]
        dest = RESULTS / tag
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("config.yaml", "metrics.jsonl"):
            shutil.copy(out / f, dest / f)
        summary = {
            "command": " ".join([Path(cmd[0]).name] + cmd[1:]).replace(str(ROOT) + "/", ""),
            "world_size": nproc,
            "wall_clock_s": round(wall, 1),
            "wall_clock_includes": f"model load, evaluations (66 prompts each) at iterations {[r['iteration'] for r in evals]}, "
                                   "the iterations, checkpoints",
            "load_average_before": load_before,
            "load_average_after": load_after,
            "eval_reward": {r["iteration"]: r["eval/reward"] for r in evals},
            "eval_kl_exact_nats_per_response": {r["iteration"]: r["eval/kl"] for r in evals},
            "peak_rss_mb": max(r.get("memory/peak_mb", 0.0) for r in rows),
            "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        }
        (dest / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{name}: {wall / 60:.1f} min, eval reward {evals[0]['eval/reward']:.3f} -> {evals[-1]['eval/reward']:.3f}", flush=True)


def _minibatch(name: str) -> int:
    from rlhf_fast.config import load_config

    return load_config(ROOT / "configs" / f"{name}_smollm2_sentiment.yaml", []).ppo.minibatch_size


def report(png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    print("| algorithm | held-out reward before → after | gain | exact KL to the reference (nats / response) | wall time | peak RSS | commit |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, label in ALGORITHMS.items():
        dest = RESULTS / f"{name}_smollm2_sentiment"
        if not (dest / "summary.json").is_file():
            continue
        s = json.loads((dest / "summary.json").read_text())
        rows = _metrics(dest / "metrics.jsonl")
        # Training wall-clock at each evaluation: iterations' and evaluations' own time (model load excluded).
        clock, xs, ys = 0.0, [], []
        for r in rows:
            clock += r.get("time/iteration", 0.0) + r.get("time/eval", 0.0)
            if "eval/reward" in r:
                xs.append(clock / 60)
                ys.append(r["eval/reward"])
        ax.plot(xs, ys, marker="o", ms=3, label=label)
        before, after = ys[0], ys[-1]
        kl = [r["eval/kl"] for r in rows if "eval/kl" in r][-1]
        peak = max(r.get("memory/peak_mb", 0.0) for r in rows)
        load = s.get("load_average_before", "n/a").split(",")[0]
        print(f"| {label} | {before:.3f} → {after:.3f} | {after - before:+.3f} | {kl:.1f} | {s['wall_clock_s'] / 60:.1f} min "
              f"(load {load}) | {peak / 1024:.1f} GB | {s.get('commit', 'earlier')[:7]} |")
    ax.set_xlabel("training wall-clock (min, 2-core CPU; iterations + evaluations)")
    ax.set_ylabel("held-out VADER reward (66 prompts)")
    ax.set_title("SmolLM2-135M-Instruct, sentiment task: one loop, seven algorithms")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"\nplot: {png.relative_to(ROOT)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("names", nargs="*", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    r.add_argument("--nproc", type=int, default=1, help="ranks under torchrun (data-parallel, FSDP2) on this machine")
    sub.add_parser("report")
    args = p.parse_args()
    os.chdir(ROOT)
    if args.cmd == "run":
        run(args.names, args.nproc)
    else:
        report(RESULTS / "algorithms_smollm2_sentiment.png")


if __name__ == "__main__":
    main()

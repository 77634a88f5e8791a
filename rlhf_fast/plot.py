"""``rlhf-fast plot RUN_DIR``: the training curves of a run (from metrics.jsonl) as one PNG."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from .errors import UserError
from .tracking import read_metrics

PANELS = [  # (title, [(metric, label)])
    ("reward", [("reward/mean", "train (batch mean)"), ("eval/reward", "eval (held-out prompts)")]),
    ("KL to reference (nats / response)", [("kl", "train (estimator)"), ("eval/kl", "eval (exact)")]),
    ("policy entropy (nats / token)", [("policy/entropy", "train")]),
    ("policy update", [("policy/clipfrac", "clip fraction"), ("policy/approx_kl", "approx KL (old || new)"),
                       ("trpo/kl", "TRPO step: KL (old || new) per token"), ("groups/kept_frac", "groups kept (dynamic sampling)")]),
    ("critic", [("loss/value", "value loss"), ("value/explained_variance", "explained variance")]),
    ("response length (tokens)", [("response/length", "train"), ("eval/response_length", "eval")]),
    ("seconds per phase", [("time/generate", "generate"), ("time/score", "score"), ("time/update", "update")]),
    ("throughput (response tokens / s)", [("throughput/generate_tokens_per_s", "generation"), ("throughput/tokens_per_s", "whole iteration")]),
]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["iteration"])
            ys.append(v)
    return xs, ys


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves of ``run_dir`` to ``out`` (default RUN_DIR/curves.png); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise UserError(f"plot: no metrics.jsonl with rows in {str(run_dir)!r}")
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig, axes = plt.subplots(2, 4, figsize=(19, 8))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key, label in keys:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:  # e.g. the critic panel of a critic-free algorithm
            ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(f"RL run: {Path(run_dir).resolve().name}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    p.add_argument("-o", "--out", help="output PNG (default RUN_DIR/curves.png)")


def run(args: argparse.Namespace) -> int:
    print(plot_run(args.run_dir, args.out))
    return 0

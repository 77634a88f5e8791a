"""Reward-model evaluation: preference accuracy, margin, rank correlation, calibration, reward statistics.

Inputs are plain sequences of floats (NumPy does the arithmetic; SciPy the rank correlations); each group is
one prompt's responses, best first, as :class:`rlhf_fast.preference_data.Preference` stores them.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np


def pair_arrays(groups: Sequence[Sequence[float]], strict: Sequence[Sequence[bool]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(better, worse) rewards over every strictly ordered pair (i < j) of every group, as float64 arrays."""
    better, worse = [], []
    for g, rewards in enumerate(groups):
        level = np.concatenate([[0], np.cumsum(strict[g] if strict is not None else np.ones(len(rewards) - 1))])
        for i in range(len(rewards)):
            for j in range(i + 1, len(rewards)):
                if level[i] < level[j]:
                    better.append(rewards[i])
                    worse.append(rewards[j])
    return np.asarray(better, dtype=np.float64), np.asarray(worse, dtype=np.float64)


def preference_accuracy(better: Sequence[float], worse: Sequence[float]) -> float:
    """Share of pairs where the preferred response gets the higher reward; an exact tie counts one half."""
    b, w = np.asarray(better, np.float64), np.asarray(worse, np.float64)
    if b.size == 0:
        return float("nan")
    return float(np.mean((b > w) + 0.5 * (b == w)))


def mean_margin(better: Sequence[float], worse: Sequence[float]) -> float:
    """Mean of r_better - r_worse over pairs."""
    b, w = np.asarray(better, np.float64), np.asarray(worse, np.float64)
    return float(np.mean(b - w)) if b.size else float("nan")


def rank_correlations(groups: Sequence[Sequence[float]], targets: Sequence[Sequence[float]],
                      rated: Sequence[bool] | None = None) -> dict[str, float]:
    """Spearman's rho and Kendall's tau-b (scipy.stats) between rewards and target ratings (higher = better).

    ``within``: the mean over groups (prompts) with >= 3 responses of the per-group coefficient (a 2-response
    group's coefficient is just its pairwise accuracy, so those are left out); ``global``: over all responses
    pooled, over the groups flagged ``rated`` (all when None): only ratings on one scale, e.g. a judge's scores,
    are comparable across prompts. NaN when undefined.
    """
    from scipy import stats

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant inputs: scipy warns and returns NaN, which we drop or report
        rho, tau = [], []
        for r, t in zip(groups, targets):
            if len(r) >= 3 and len(set(t)) > 1 and len(set(r)) > 1:
                rho.append(stats.spearmanr(r, t).statistic)
                tau.append(stats.kendalltau(r, t).statistic)
        out["spearman"] = float(np.mean(rho)) if rho else float("nan")
        out["kendall"] = float(np.mean(tau)) if tau else float("nan")
        use = [rated is None or bool(rated[i]) for i in range(len(groups))]
        flat_r = [x for g, u in zip(groups, use) if u for x in g]
        flat_t = [x for g, u in zip(targets, use) if u for x in g]
        ok = len(flat_r) >= 3 and len(set(flat_t)) > 1 and len(set(flat_r)) > 1
        out["spearman_global"] = float(stats.spearmanr(flat_r, flat_t).statistic) if ok else float("nan")
        out["kendall_global"] = float(stats.kendalltau(flat_r, flat_t).statistic) if ok else float("nan")
    return out


def calibration(better: Sequence[float], worse: Sequence[float], n_bins: int = 10) -> dict:
    """Expected calibration error of p = sigmoid(r_better - r_worse) read as P(better > worse) (Guo et al. 2017).

    Each pair's prediction is the response it favours, with confidence max(p, 1 - p) in [0.5, 1]; the
    confidences fall in ``n_bins`` equal bins over [0.5, 1] (the last bin closed), and
    ECE = sum_b (n_b / N) |accuracy_b - confidence_b|. Returns {"ece", "bins": [{lo, hi, count, confidence,
    accuracy}, ...]}; an exact tie (p = 0.5) counts as half right.
    """
    b, w = np.asarray(better, np.float64), np.asarray(worse, np.float64)
    if n_bins < 1:
        raise ValueError(f"n_bins: must be >= 1, got {n_bins}")
    if b.size == 0:
        return {"ece": float("nan"), "bins": []}
    d = b - w
    p = 1.0 / (1.0 + np.exp(-d))
    conf = np.maximum(p, 1.0 - p)
    correct = (d > 0) + 0.5 * (d == 0)
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for k in range(n_bins):
        sel = idx == k
        n = int(sel.sum())
        c = float(conf[sel].mean()) if n else float("nan")
        a = float(correct[sel].mean()) if n else float("nan")
        if n:
            ece += n / b.size * abs(a - c)
        bins.append({"lo": float(edges[k]), "hi": float(edges[k + 1]), "count": n, "confidence": c, "accuracy": a})
    return {"ece": float(ece), "bins": bins}


def reward_stats(groups: Sequence[Sequence[float]]) -> dict[str, float]:
    flat = np.asarray([x for g in groups for x in g], np.float64)
    return {"reward_mean": float(flat.mean()) if flat.size else float("nan"),
            "reward_std": float(flat.std()) if flat.size else float("nan")}


def evaluate_rewards(groups: Sequence[Sequence[float]], strict: Sequence[Sequence[bool]], targets: Sequence[Sequence[float]],
                     n_bins: int = 10, rated: Sequence[bool] | None = None) -> dict:
    """All metrics of one set of groups: accuracy, margin, rank correlations, ECE (+ its bins), reward mean/std."""
    better, worse = pair_arrays(groups, strict)
    cal = calibration(better, worse, n_bins)
    out = {"accuracy": preference_accuracy(better, worse), "margin": mean_margin(better, worse), "pairs": int(better.size)}
    out |= rank_correlations(groups, targets, rated)
    out |= {"ece": cal["ece"]} | reward_stats(groups)
    out["calibration_bins"] = cal["bins"]
    return out


def plot_reliability(bins: list[dict], out: str | Path, title: str = "reward model calibration") -> Path:
    """Reliability diagram: accuracy against mean confidence per bin, bar widths the bins, counts annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0.5, 1.0], [0.5, 1.0], "--", color="gray", label="perfect calibration")
    full = [b for b in bins if b["count"]]
    if full:
        ax.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=[b["hi"] - b["lo"] for b in full], align="edge",
               alpha=0.4, edgecolor="black", label="accuracy per bin")
        ax.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "o-", color="C3", label="(confidence, accuracy)")
        for b in full:
            ax.annotate(str(b["count"]), ((b["lo"] + b["hi"]) / 2, min(b["accuracy"], 0.97) + 0.01), ha="center", fontsize=7)
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("confidence max(p, 1-p), p = sigmoid(r_w - r_l)")
    ax.set_ylabel("fraction of pairs ordered right")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def scalars(metrics: dict) -> dict[str, float]:
    """The numeric entries (for a metrics.jsonl row; NaN stays NaN), without the calibration bins."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

"""Run outputs: ``metrics.jsonl`` (one JSON object per iteration), TensorBoard events, ``samples.jsonl``."""
from __future__ import annotations

import json
import math
from pathlib import Path


def _clean(v):
    """JSON has no NaN/inf: write them as strings so a bad iteration stays visible in the log."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_jsonl(path: Path, last_iteration: int) -> None:
    """Drop rows logged after ``last_iteration`` (an iteration that ran past the checkpoint we resume from)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("iteration", 0) <= last_iteration]
        path.write_text("".join(line + "\n" for line in keep))


class Tracker:
    def __init__(self, run_dir: str | Path, resume_iteration: int | None = None, tensorboard: bool = True, config=None,
                 comment: str | None = None):
        """Opens ``run_dir`` (created; ``config``, the run's config dataclass, written to config.yaml when given, with
        ``comment`` as its first line)."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            from .config import save_config

            save_config(config, self.run_dir / "config.yaml", comment)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        if resume_iteration is None:
            for p in (self.metrics_path, self.samples_path):
                p.unlink(missing_ok=True)
        else:
            for p in (self.metrics_path, self.samples_path):
                _truncate_jsonl(p, resume_iteration)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=None if resume_iteration is None else resume_iteration + 1)

    def log(self, iteration: int, metrics: dict) -> None:
        row = {"iteration": iteration, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(k, v, iteration)
            self.writer.flush()

    def log_samples(self, iteration: int, prompts: list[str], responses: list[str], rewards: list[float], tag: str = "train") -> None:
        with open(self.samples_path, "a") as f:
            for p, r, s in zip(prompts, responses, rewards):
                f.write(json.dumps({"iteration": iteration, "split": tag, "prompt": p, "response": r, "reward": _clean(s)}) + "\n")
        if self.writer is not None and prompts:
            text = "\n\n".join(f"**{p}**\n\n{r}\n\n(reward {s:.3f})" for p, r, s in zip(prompts, responses, rewards))
            self.writer.add_text(f"samples/{tag}", text, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class NullTracker:
    """What ranks other than 0 log to: nothing (rank 0 writes metrics, samples and TensorBoard for the job)."""

    def log(self, iteration: int, metrics: dict) -> None:
        pass

    def log_samples(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

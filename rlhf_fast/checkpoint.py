"""Checkpoints that resume exactly, written atomically, and a SIGINT/SIGTERM handler that asks for one.

``RUN_DIR/checkpoints/iter-000012/`` holds ``weights.safetensors`` (the trainable tensors, by name),
``optimizer.pt`` (optimizer + LR scheduler state), ``rng.pt`` / ``rng.json`` (torch CPU/CUDA generator states; Python's and
NumPy's) and ``state.json`` (iteration, KL coefficient, sampler position, counters). It is written under a
temporary name and renamed into place, so a crash mid-write never leaves a half checkpoint that looks whole.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

CKPT_DIR = "checkpoints"


def trainable_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """``{"<role>.<param name>": tensor}`` of the parameters that train (tied weights appear once)."""
    out = {}
    for role, module in modules.items():
        for name, p in module.named_parameters():
            if p.requires_grad:
                out[f"{role}.{name}"] = p.detach().contiguous().cpu()
    return out


def rng_state() -> dict:
    """Every generator the run draws from: torch (CPU, CUDA) as tensors, Python's and NumPy's as JSON-able lists."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, iteration: int, modules: dict[str, torch.nn.Module], optimizer, scheduler,
                    state: dict, rng: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``iteration`` atomically; keep the newest ``keep``. Returns its folder."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter-{iteration:06d}"
    tmp = root / f".tmp-iter-{iteration:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(modules), tmp / "weights.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    rng = rng if rng is not None else rng_state()
    torch.save({k: v for k, v in rng.items() if k in ("torch", "cuda")}, tmp / "rng.pt")
    (tmp / "rng.json").write_text(json.dumps({k: rng[k] for k in ("python", "numpy")}))
    (tmp / "state.json").write_text(json.dumps(dict(state, iteration=iteration), indent=1))
    if final.exists():  # re-saving the same iteration (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(root.glob("iter-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path:
    root = Path(run_dir) / CKPT_DIR
    found = sorted(p for p in root.glob("iter-*") if (p / "state.json").is_file()) if root.is_dir() else []
    if not found:
        raise UserError(f"--resume: no checkpoint in {str(root)!r}")
    return found[-1]


def resume_latest(run_dir: str | Path, modules: dict[str, torch.nn.Module], optimizer, scheduler) -> tuple[dict, Path]:
    """Load ``run_dir``'s latest checkpoint in place and restore the RNG states it saved.

    Returns (its state.json dict, for the trainer's own counters; its path). Raises UserError if there is none.
    """
    path = latest_checkpoint(run_dir)
    state, rng = load_checkpoint(path, modules, optimizer, scheduler)
    set_rng_state(rng)
    return state, path


def load_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module], optimizer, scheduler) -> tuple[dict, dict]:
    """Load weights and optimizer state in place; returns (state.json dict, rng state) for the caller to apply."""
    path = Path(path)
    tensors = load_file(path / "weights.safetensors")
    expected = trainable_state(modules)
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise UserError(f"checkpoint {str(path)!r} does not match this configuration "
                        f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the run's own config.yaml")
    params = {f"{role}.{n}": p for role, m in modules.items() for n, p in m.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise UserError(f"checkpoint {str(path)!r}: {name} has shape {tuple(t.shape)}, the model {tuple(params[name].shape)}")
            params[name].copy_(t)
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True) | json.loads((path / "rng.json").read_text())
    return json.loads((path / "state.json").read_text()), rng


class StopRequest:
    """SIGINT / SIGTERM set ``requested``; the trainer checkpoints at the next safe point and exits.

    A second signal raises KeyboardInterrupt at once (no checkpoint). Handlers are restored on exit.
    """

    def __init__(self):
        self.requested: str | None = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: saving a checkpoint after the current phase (send it again to abort)", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        return False

"""Checkpoints that resume exactly, written atomically, and a SIGINT/SIGTERM handler that asks for one.

``RUN_DIR/checkpoints/iter-000012/`` holds ``sharded/`` (the trainable tensors and the optimizer state, keyed by
parameter name, written by ``torch.distributed.checkpoint``: each rank its own shards under FSDP2, so a run resumes at
another world size with weights and optimizer state resharded), ``scheduler.pt`` (the LR schedule), ``rng-<rank>.pt`` /
``rng-<rank>.json`` (torch CPU/CUDA generator states; Python's and NumPy's, per rank) and ``state.json`` (iteration, KL
coefficient, sampler position, counters). It is written under a temporary name and renamed into place, so a crash
mid-write never leaves a half checkpoint that looks whole.
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

from .distributed import World
from .errors import UserError

CKPT_DIR = "checkpoints"


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


def _dcp_state(modules: dict[str, torch.nn.Module], optimizer) -> tuple[dict, torch.nn.Module]:
    """({"model": trainable tensors by "<role>.<name>", "optimizer": its state keyed the same way}, the ModuleDict they
    index): FSDP2 shards as DTensors, plain tensors in one process (``torch.distributed.checkpoint.state_dict``). An
    optimizer that has not stepped yet has no state and is left out: reading it would make torch initialise it with a
    zero step, which AdamW would count."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    root = torch.nn.ModuleDict(modules)  # a view: the roles' modules, not copies
    trainable = {n for n, p in root.named_parameters() if p.requires_grad}  # tied weights appear once
    state = {"model": {k: v for k, v in get_model_state_dict(root).items() if k in trainable}}
    if optimizer.state:
        state["optimizer"] = get_optimizer_state_dict(root, optimizer)
    return state, root


def save_checkpoint(run_dir: str | Path, iteration: int, modules: dict[str, torch.nn.Module], optimizer, scheduler,
                    state: dict, rng: dict | None = None, keep: int = 2, world: World = World()) -> Path:
    """Write checkpoint ``iteration`` atomically (every rank calls it); keep the newest ``keep``. Returns its folder."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / CKPT_DIR
    final = root / f"iter-{iteration:06d}"
    tmp = root / f".tmp-iter-{iteration:06d}"
    if world.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if world.active:
        dist.barrier()
    dcp_state, _ = _dcp_state(modules, optimizer)
    dcp.save(dcp_state, checkpoint_id=tmp / "sharded")
    rng = rng if rng is not None else rng_state()
    torch.save({k: v for k, v in rng.items() if k in ("torch", "cuda")}, tmp / f"rng-{world.rank}.pt")
    (tmp / f"rng-{world.rank}.json").write_text(json.dumps({k: rng[k] for k in ("python", "numpy")}))
    if world.active:
        dist.barrier()
    if world.main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, iteration=iteration, world_size=world.size,
                                                         optimizer_stepped="optimizer" in dcp_state), indent=1))
        if final.exists():  # re-saving the same iteration (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(root.glob("iter-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if world.active:
        dist.barrier()
    return final


def latest_checkpoint(run_dir: str | Path) -> Path:
    root = Path(run_dir) / CKPT_DIR
    found = sorted(p for p in root.glob("iter-*") if (p / "state.json").is_file()) if root.is_dir() else []
    if not found:
        raise UserError(f"--resume: no checkpoint in {str(root)!r}")
    return found[-1]


def resume_latest(run_dir: str | Path, modules: dict[str, torch.nn.Module], optimizer, scheduler,
                  world: World = World()) -> tuple[dict, Path]:
    """Load ``run_dir``'s latest checkpoint in place and restore the RNG states it saved.

    Returns (its state.json dict, for the trainer's own counters; its path). Raises UserError if there is none.
    """
    path = latest_checkpoint(run_dir)
    state, rng = load_checkpoint(path, modules, optimizer, scheduler, world)
    set_rng_state(rng)
    return state, path


def load_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module], optimizer, scheduler,
                    world: World = World()) -> tuple[dict, dict]:
    """Load weights and optimizer state in place (resharded when the world size changed); returns (state.json dict,
    this rank's RNG state: its own, or rank 0's when the saving run had fewer ranks) for the caller to apply."""
    path = Path(path)
    if not (path / "sharded").is_dir():
        raise UserError(f"checkpoint {str(path)!r} has no sharded/ folder: it was written by an earlier version of rlhf_fast "
                        "(weights.safetensors), which this one does not resume")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    saved = json.loads((path / "state.json").read_text())
    state, root = _dcp_state(modules, optimizer)
    if saved.get("optimizer_stepped", True):
        state["optimizer"] = get_optimizer_state_dict(root, optimizer)  # the shapes to load into
    try:
        dcp.load(state, checkpoint_id=path / "sharded")
    except Exception as e:  # a key or shape the checkpoint lacks: another configuration's run
        raise UserError(f"checkpoint {str(path)!r} does not match this configuration ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]}); resume with the run's own config.yaml") from None
    set_model_state_dict(root, state["model"], options=StateDictOptions(strict=False))
    if "optimizer" in state:
        set_optimizer_state_dict(root, optimizer, state["optimizer"])
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    rank = world.rank if (path / f"rng-{world.rank}.pt").is_file() else 0
    rng = torch.load(path / f"rng-{rank}.pt", map_location="cpu", weights_only=True) | json.loads((path / f"rng-{rank}.json").read_text())
    return saved, rng


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

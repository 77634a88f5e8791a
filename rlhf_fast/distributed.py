"""Data parallelism on PyTorch's own stack: torchrun's environment, one process group with a timeout, FSDP2 sharding
(``fully_shard``: one unit per decoder layer, then the root), the global reductions a data-parallel trainer needs,
and the full model written once.

A run launched by ``torchrun --nproc_per_node N -m rlhf_fast.cli ...`` (``WORLD_SIZE`` > 1 in the environment) sets up
the group in :func:`setup` (NCCL on CUDA, gloo on CPU; collectives time out after ``dist_timeout_s``, so a rank that
died ends the job instead of hanging it). Every rank holds a shard of each model; a unit's parameters are gathered
while its forward and backward run and its gradients are reduce-scattered (averaged over ranks) after. The fused ops
read the LM-head weight outside the head's own forward, so the trainers run each micro-batch's whole computation as
the root module's forward (:func:`in_root`): the root's parameters (embeddings, tied head, final norm) are then
unsharded, and their gradients reduce-scattered like the layers'. Memory: one full root (with the head, V x H) per
rank while a micro-batch runs.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    mesh: object = None  # the 1-D DeviceMesh of every rank that FSDP2 shards over (None in one process)

    @property
    def main(self) -> bool:
        """Rank 0: the only one that writes logs, samples, plots and the final model."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def process_group(self):
        """The group of every rank, for the ops' batch statistics (``process_group=``); None in one process."""
        return dist.group.WORLD if self.active else None

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (float64, one all-reduce); the values themselves in one process."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (same shape on each), concatenated along dim 0 in rank order, on ``t``'s device."""
        if not self.active:
            return t
        x = t.to(_collective_device()).contiguous()  # NCCL gathers CUDA tensors only
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x)
        return torch.cat(parts).to(t.device)

    def masked_mean(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        """The mean of ``x`` where ``mask`` holds, over every rank's entries (0 when there are none)."""
        total, n = self.sum([float(torch.where(mask, x, 0).sum()), float(mask.sum())])
        return total / max(n, 1.0)

    def variance(self, x: torch.Tensor) -> float:
        """The population variance of every rank's entries of ``x`` (two passes over float64; 0 when there are none)."""
        x = x.double()
        n, total = self.sum([float(x.numel()), float(x.sum())])
        return self.sum([float((x - total / n).square().sum())])[0] / n if n else 0.0

    def max(self, value: int) -> int:
        """The largest of every rank's ``value``."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (so that all ranks take the same branch around a collective)."""
        return self.sum([float(not flag)])[0] == 0 if self.active else flag

    def shares(self, counts: list[float]) -> list[float]:
        """Each of this rank's ``counts`` over the total of every rank's, times the world size: the weights of
        micro-batch losses that are means over ``counts`` items, so that accumulated gradients, which FSDP averages over
        ranks, equal those of the global batch's mean."""
        total = max(self.sum([sum(counts)])[0], 1.0)
        return [c * self.size / total for c in counts]

    def mean_metrics(self, sums: dict[str, float], weight: float) -> dict[str, float]:
        """sum over ranks of ``sums`` / sum over ranks of ``weight``: global weighted means, not rank 0's."""
        keys = sorted(sums)
        *totals, w = self.sum([sums[k] for k in keys] + [weight])
        return {k: v / max(w, 1e-12) for k, v in zip(keys, totals)}


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def setup(device: torch.device, timeout_s: float) -> tuple[World, torch.device]:
    """The process group of a torchrun launch (``WORLD_SIZE`` > 1), else a world of one; returns it and this rank's
    device (``cuda:LOCAL_RANK`` on CUDA). Raises UserError for an inconsistent environment."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 and not dist.is_initialized():
        return World(), device
    try:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise UserError(f"WORLD_SIZE={size} but RANK is missing or not an integer: launch with torchrun") from None
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    return World(dist.get_rank(), dist.get_world_size(), local, mesh), device


def _root(model: nn.Module) -> nn.Module:
    """The module FSDP2 makes the root: a peft model's inner transformers model (peft's ``generate`` and ``forward``
    call that one's forward, not the wrapper's), else ``model``."""
    from .models import unwrap

    return unwrap(model)


def shard(model: nn.Module, layers: nn.ModuleList, *, mesh=None, bf16_params: bool = False, cpu_offload: bool = False) -> nn.Module:
    """FSDP2: each of ``layers`` its own unit, then ``model`` (what remains: embeddings, tied head, final norm; inside a
    peft wrapper) the root, over ``mesh`` (``World.mesh``; None: every rank).
    ``bf16_params``: forwards in bf16 with fp32 gradient reduction (``MixedPrecisionPolicy``; the root leaves its
    inputs alone: a rollout's log-probs and advantages stay fp32, and the trainers' autocast picks compute dtypes);
    ``cpu_offload``: parameters, gradients and optimizer state live on the CPU between uses (``CPUOffloadPolicy``),
    for a model on a GPU. Raises UserError for ``cpu_offload`` with a model on the CPU."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw, root = {"mesh": mesh}, {"mesh": mesh}
    if bf16_params:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    if cpu_offload:
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise UserError(f"fsdp_cpu_offload: offloads a GPU run's parameters to the CPU; this run's model is on {device}")
        kw["offload_policy"] = root["offload_policy"] = CPUOffloadPolicy()
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(_root(model), **root)
    return model


def in_root(model: nn.Module, fn, *args):
    """``fn(*args)`` as the FSDP root's forward when ``model`` is one (its parameters gathered, their gradients
    reduce-scattered after backward); a plain call otherwise."""
    from .integrations.hf import _as_forward, _fsdp_unit

    root = _root(model)
    return _as_forward(root, fn, *args) if _fsdp_unit(root) else fn(*args)


def reshard(*modules) -> None:
    """Free the gathered parameters of FSDP2 roots that ran forwards only (a frozen reference): a root keeps its
    parameters gathered after its forward, for a backward that never comes. No-op for None and unsharded modules."""
    from .integrations.hf import _fsdp_unit

    for m in modules:
        if m is not None and _fsdp_unit(_root(m)):
            _root(m).reshard()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s whole state dict: under FSDP2 gathered from every rank's shards onto the CPU (every rank calls;
    a tied weight under one name), else the model's own."""
    from .integrations.hf import _fsdp_unit

    if not _fsdp_unit(_root(model)):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}  # a tied weight under one name
    return {k: v for k, v in state.items() if k in own}


def save_pretrained(model: nn.Module, out, world: World) -> None:
    """``model.save_pretrained(out)`` as one Hugging Face folder: under FSDP2 every rank takes part in gathering the
    full state dict (on the CPU) and rank 0 writes it; a peft model writes its adapter."""
    from .integrations.hf import _fsdp_unit

    if not _fsdp_unit(_root(model)):
        if world.main:
            model.save_pretrained(out)
        return
    state = full_state_dict(model)
    if world.main:
        model.save_pretrained(out, state_dict=state)
    dist.barrier()

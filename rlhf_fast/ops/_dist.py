"""Batch statistics over data-parallel ranks: sums and extrema across a ``torch.distributed`` process group.

The ops that normalise over the batch (whitening, REINFORCE++'s returns, a batch-mean baseline) take a
``process_group``: None keeps their statistics on this process's tensors; a group makes them those of every rank's
tensors together, so N ranks with a share of the batch each get what one process with the whole batch would. Every
rank of the group must then call the op (one all-reduce per kind of statistic), with tensors on the device the
group's backend reduces on (CUDA for NCCL, CPU for gloo).
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_group(process_group):
    """``process_group`` itself (None or a ProcessGroup of an initialised ``torch.distributed``); else raises."""
    if process_group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised (call init_process_group first, or pass None)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup or None, got {type(process_group).__name__}")
    return process_group


def reduce(values: list[Tensor], process_group, op: str = "sum") -> list[Tensor]:
    """0-d ``values`` reduced over the ranks of ``process_group`` (``op``: sum | max), in float64 with one
    all-reduce; the values themselves when the group is None."""
    if process_group is None:
        return values
    import torch.distributed as dist

    t = torch.stack([v.double() for v in values])
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=process_group)
    return list(t.unbind())

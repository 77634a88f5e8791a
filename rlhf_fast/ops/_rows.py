"""Run the fused work on the rows that count only, where finding them is free.

Prompt and padding positions (label == ignore_index) are often half of an RLHF batch; every backend would
compute their logits and then zero them. Gathering the valid rows first (a copy of n x H, next to n x H x V
of matmul) and scattering the results back skips that work. Counting them is a host read, though: a
device->host sync on CUDA and a graph break under torch.compile. There all rows run (the backends give
ignored rows 0 and no gradient).
"""
from __future__ import annotations

import torch
from torch import Tensor


class ValidRows:
    def __init__(self, valid: Tensor):
        self.n = valid.numel()
        self.idx = None
        if valid.device.type == "cpu" and not torch.compiler.is_compiling():
            count = int(valid.sum())
            # Nothing to skip, or nothing left (then the backends' own all-ignored path keeps the graph intact).
            if count not in (0, self.n):
                self.idx = valid.nonzero().squeeze(1)

    def take(self, x: Tensor | None) -> Tensor | None:
        """[N, ...] -> [n_valid, ...] (differentiable)."""
        return x if x is None or self.idx is None else x.index_select(0, self.idx)

    def put(self, y: Tensor | None) -> Tensor | None:
        """[n_valid, ...] -> [N, ...] with zeros at the skipped rows (differentiable)."""
        if y is None or self.idx is None:
            return y
        return y.new_zeros(self.n, *y.shape[1:]).index_copy(0, self.idx, y)

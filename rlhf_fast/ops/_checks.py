"""Input checks shared by the public ops: every error names the argument, what was expected and what came."""
from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor(name: str, x, *, ndim: int | None = None, min_ndim: int | None = None, dtypes=None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in ({', '.join(map(_dt, dtypes))}), got {_dt(x.dtype)}")
    return x


def float_tensor(name: str, x, **kw) -> Tensor:
    return tensor(name, x, dtypes=kw.pop("dtypes", FLOAT_DTYPES), **kw)


def same_shape(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (that of {ref_name}), got {tuple(x.shape)}")


def same_device(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of {ref_name}), got {x.device}")


def same_dtype(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {_dt(ref.dtype)} (that of {ref_name}), got {_dt(x.dtype)}")


def mask(name: str, m, ref_name: str, ref: Tensor) -> Tensor:
    """A response mask: bool, or a float/int tensor of 0/1, with exactly the shape of ``ref``."""
    tensor(name, m)
    same_shape(name, m, ref_name, ref)
    same_device(name, m, ref_name, ref)
    if m.dtype == torch.bool:
        return m
    if m.is_floating_point() or m.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        if bool(((m != 0) & (m != 1)).any()):
            raise ValueError(f"{name}: expected only 0/1 entries")
        return m != 0
    raise TypeError(f"{name}: expected a bool or 0/1 tensor, got dtype {_dt(m.dtype)}")


def positive(name: str, v, *, allow_none: bool = False, above: float = 0.0):
    if v is None and allow_none:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= above:
        raise ValueError(f"{name}: expected a finite number > {above:g}, got {v!r}")
    return float(v)


def in_range(name: str, v, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
        raise ValueError(f"{name}: expected a number in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


def choice(name: str, v, options) -> str:
    if v not in options:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, options))}, got {v!r}")
    return v


def labels_for(name: str, labels, hidden: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """labels: int64 with hidden's leading shape, each in [0, vocab) or equal to ignore_index."""
    tensor(name, labels, dtypes=(torch.int64,))
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{name}: expected shape {tuple(hidden.shape[:-1])} (hidden's leading dims), got {tuple(labels.shape)}")
    same_device(name, labels, "hidden", hidden)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = labels[bad].flatten()[0].item()
        raise ValueError(f"{name}: expected values in [0, {vocab}) or ignore_index={ignore_index}, got {value}")
    return labels


def linear_head(hidden, weight, bias=None, *, hidden_name="hidden", weight_name="weight") -> tuple[Tensor, Tensor, Tensor | None]:
    """hidden [..., H] float, weight [V, H] of hidden's dtype and device, bias [V] or None."""
    float_tensor(hidden_name, hidden, min_ndim=1)
    float_tensor(weight_name, weight, ndim=2)
    same_dtype(weight_name, weight, hidden_name, hidden)
    same_device(weight_name, weight, hidden_name, hidden)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{weight_name}: expected shape [V, {hidden.shape[-1]}] ({hidden_name}'s last dim), got {tuple(weight.shape)}")
    if bias is not None:
        float_tensor("bias", bias, ndim=1)
        same_dtype("bias", bias, hidden_name, hidden)
        same_device("bias", bias, hidden_name, hidden)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape [{weight.shape[0]}] (weight's V), got {tuple(bias.shape)}")
    return hidden, weight, bias

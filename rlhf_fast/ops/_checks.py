"""Input checks shared by the public ops: every error names the argument, what was expected and what came.

Shape, dtype and device checks are static: always eager. Value checks (labels in range, 0/1 masks) need the
tensor's contents: read on the host they cost a device->host sync on CUDA and a graph break under torch.compile,
so ``check`` (the ops' ``check_inputs``) picks how: see :func:`any_bad`.
"""
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


def any_bad(check: bool | None, bad: Tensor, msg: str) -> bool:
    """Whether the bool tensor ``bad`` (entries breaking a rule) has a set entry, read on the host when ``check`` is
    True, or None on a CPU tensor outside torch.compile: the caller then raises ValueError. Otherwise (None on CUDA
    or under torch.compile) False, after a device-side ``torch._assert_async``: no host sync; a failure is a
    RuntimeError with ``msg`` on CPU, a device-side assert on CUDA. (check False: the caller skips the check.)"""
    if check or (check is None and bad.device.type == "cpu" and not torch.compiler.is_compiling()):
        return bool(bad.any())
    torch._assert_async(~bad.any(), msg)
    return False


def mask(name: str, m, ref_name: str, ref: Tensor, check: bool | None = None) -> Tensor:
    """A response mask: bool, or a float/int tensor of 0/1, with exactly the shape of ``ref``. ``check``: how its
    0/1 values are checked (see :func:`any_bad`; False: not at all)."""
    tensor(name, m)
    same_shape(name, m, ref_name, ref)
    same_device(name, m, ref_name, ref)
    if m.dtype == torch.bool:
        return m
    if m.is_floating_point() or m.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        msg = f"{name}: expected only 0/1 entries"
        if check is not False and any_bad(check, (m != 0) & (m != 1), msg):
            raise ValueError(msg)
        return m != 0
    raise TypeError(f"{name}: expected a bool or 0/1 tensor, got dtype {_dt(m.dtype)}")


def positive(name: str, v, *, allow_none: bool = False, above: float = 0.0):
    if v is None and allow_none:
        return v
    # finiteness by comparisons, not math.isfinite: torch.compile(dynamic=True) traces them on symbolic floats
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not -math.inf < v < math.inf or v <= above:
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


def labels_for(name: str, labels, hidden: Tensor, vocab: int, ignore_index: int, check: bool | None = None) -> Tensor:
    """labels: int64 with hidden's leading shape, each in [0, vocab) or equal to ignore_index (values checked as
    ``check`` says: see :func:`any_bad`; False: not at all)."""
    tensor(name, labels, dtypes=(torch.int64,))
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{name}: expected shape {tuple(hidden.shape[:-1])} (hidden's leading dims), got {tuple(labels.shape)}")
    same_device(name, labels, "hidden", hidden)
    if check is False:
        return labels
    msg = f"{name}: expected values in [0, {vocab}) or ignore_index={ignore_index}"
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if any_bad(check, bad, msg):
        raise ValueError(f"{msg}, got {labels[bad].flatten()[0].item()}")
    return labels


def linear_head(hidden, weight, bias=None, *, hidden_name="hidden", weight_name="weight",
                bias_name="bias") -> tuple[Tensor, Tensor, Tensor | None]:
    """hidden [..., H], weight [V, H] and bias [V] or None on one device; each float32/bfloat16/float16 on its own
    (the ops compute in fp32 whatever the mix: a bf16 trunk with an fp32 head is common)."""
    float_tensor(hidden_name, hidden, min_ndim=1)
    float_tensor(weight_name, weight, ndim=2)
    same_device(weight_name, weight, hidden_name, hidden)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{weight_name}: expected shape [V, {hidden.shape[-1]}] ({hidden_name}'s last dim), got {tuple(weight.shape)}")
    if bias is not None:
        float_tensor(bias_name, bias, ndim=1)
        same_device(bias_name, bias, hidden_name, hidden)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{bias_name}: expected shape [{weight.shape[0]}] ({weight_name}'s V), got {tuple(bias.shape)}")
    return hidden, weight, bias

"""Which backends can run here, and the choice behind ``backend="auto"``.

"torch" always runs. "cpp" needs the compiled ``rlhf_fast._C`` extension; "cuda" needs it built with CUDA
and a GPU. "triton" needs triton and a GPU, or ``TRITON_INTERPRET=1`` (the CPU interpreter, for tests:
"auto" never picks it on CPU since it is far slower than torch there).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton", "cpp", "cuda")


@functools.cache
def _ext():
    try:
        from rlhf_fast import _C
    except ImportError:
        return None
    return _C


def _triton_importable() -> bool:
    # rlhf_fast_kernels is the repo's kernels/ folder under its installed name: absent when the source tree
    # is used without installing the package (PYTHONPATH=.), and then "triton" cannot run.
    return importlib.util.find_spec("triton") is not None and importlib.util.find_spec("rlhf_fast_kernels") is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@torch.compiler.assume_constant_result  # torch.compile: a constant of the trace, not import machinery to trace
def available_backends() -> tuple[str, ...]:
    """Names among ("torch", "triton", "cpp", "cuda") that can run on this machine now."""
    out = ["torch"]
    if _triton_importable() and (torch.cuda.is_available() or _interpret()):
        out.append("triton")
    ext = _ext()
    if ext is not None:
        out.append("cpp")
        if ext.with_cuda and torch.cuda.is_available():
            out.append("cuda")
    return tuple(out)


def resolve(backend: str, op: str, device: torch.device, supported: tuple[str, ...]) -> str:
    """The backend that runs ``op`` on tensors on ``device``.

    Raises ValueError for an unknown or unsupported name, RuntimeError when the named one cannot run here.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {', '.join(map(repr, supported))}, got {backend!r}")
    if backend != "auto" and backend not in supported:
        raise ValueError(f"backend: {op} supports {', '.join(map(repr, supported))} and 'auto', got {backend!r}")
    avail = available_backends()
    if backend == "auto":
        if device.type == "cuda":
            order = ("triton", "cuda", "torch")
        else:
            order = ("cpp", "torch")
        return next(b for b in order if b in supported and b in avail)
    if backend not in avail:
        raise RuntimeError(f"backend: {backend!r} cannot run here (available: {', '.join(avail)})")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend: 'cpp' runs on CPU tensors, got device {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend: 'cuda' runs on CUDA tensors, got device {device}")
    if backend == "triton" and device.type != "cuda" and not _interpret():
        raise ValueError(f"backend: 'triton' runs on CUDA tensors (or under TRITON_INTERPRET=1), got device {device}")
    return backend

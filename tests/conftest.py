"""Test set-up. Triton kernels run on the CPU through the interpreter when no GPU is present; the variable
must be set before triton is first imported, which is why this sits at the top of conftest."""
import os

if not os.path.exists("/dev/nvidiactl") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast.ops import available_backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rel_err(out: torch.Tensor, ref: torch.Tensor, atol: float = 1e-7) -> float:
    """||out - ref|| / ||ref||, both in float64 (atol keeps all-zero references meaningful)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / (ref.norm() + atol)).item()


def backends_for(*supported: str) -> list[str]:
    return [b for b in supported if b in available_backends()]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

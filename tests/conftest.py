"""Test set-up. Triton kernels run on the CPU through the interpreter when no GPU is present; the variable
must be set before triton is first imported, which is why this sits at the top of conftest."""
import os

if not os.path.exists("/dev/nvidiactl") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast import ops  # noqa: E402
from rlhf_fast.ops import available_backends  # noqa: E402
from rlhf_fast.ops.ppo import agg_weights  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rel_err(out: torch.Tensor, ref: torch.Tensor, atol: float = 1e-7) -> float:
    """||out - ref|| / ||ref||, both in float64 (atol keeps all-zero references meaningful)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / (ref.norm() + atol)).item()


def make_inputs(seed, n, h, v, dtype, device="cpu", *, bias=False, scale=1.0, ignore_frac=0.3, lead=None):
    """Random (hidden [*lead or n, h], weight [v, h], bias [v] or None, labels) with ~ignore_frac labels ignored."""
    g = torch.Generator().manual_seed(seed)
    shape = lead or (n,)
    hidden = (torch.randn(*shape, h, generator=g) * scale).to(dtype)
    weight = torch.randn(v, h, generator=g).div(h**0.5).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, v, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(hidden), to(weight), to(b), to(labels)


def leaf(t):
    """A fresh autograd leaf copy (None stays None)."""
    return None if t is None else t.detach().clone().requires_grad_()


def f64(t):
    """A float64 CPU autograd leaf copy: the reference side of every comparison."""
    return None if t is None else t.detach().double().cpu().requires_grad_()


def composed_ppo_loss(lp, ent, old, adv, mask, *, entropy_coef, ref, kl_coef, kl_estimator, loss_agg, kl_log_ratio_clip=20.0, **kw):
    """What linear_ppo_loss must equal: ppo_policy_loss (without its KL) - entropy bonus + KL penalty, each aggregated
    as loss_agg. ``kw``: ppo_policy_loss's clip / variant keywords (loss_norm_length also sets the bonus' weights)."""
    loss, _ = ops.ppo_policy_loss(lp, old, adv, mask, loss_agg=loss_agg, **kw)
    w = agg_weights(mask, loss_agg, lp.dtype, loss_norm_length=kw.get("loss_norm_length"))
    loss = loss - entropy_coef * (torch.where(mask, ent, 0) * w).sum()
    if kl_coef:
        kl = ops.kl_penalty(lp, ref, kl_estimator, log_ratio_clip=kl_log_ratio_clip)
        loss = loss + kl_coef * (torch.where(mask, kl, 0) * w).sum()
    return loss


def backends_for(*supported: str) -> list[str]:
    """Those of ``supported`` that run on CPU tensors here (the tests that use this build CPU inputs): triton only
    through the interpreter; on a GPU machine tests/test_triton.py runs it on CUDA tensors instead."""
    cpu = {"torch", "cpp"} | ({"triton"} if os.environ.get("TRITON_INTERPRET") == "1" else set())
    return [b for b in supported if b in available_backends() and b in cpu]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

"""pytest-benchmark cases of the same variants as bench_ops.py (not part of the test suite).

    pytest benchmarks/test_bench_ops.py --benchmark-only          # shape from BENCH_SHAPE=N,H,V (default by device)
"""
import os

import pytest
import torch

import bench_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, H, V = map(int, os.environ.get("BENCH_SHAPE", "4096,4096,128256" if DEVICE == "cuda" else "1024,576,49152").split(","))
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", ["naive", "naive-compile", "torch", "triton", "liger", "cce", "cce-exact"])
def test_linear_logprobs(benchmark, variant, mode):
    if variant == "naive-compile" and DEVICE != "cuda":
        pytest.skip("torch.compile timed on CUDA only")
    fn = bench_ops.logprob_variant(variant, DEVICE)
    if fn is None:
        pytest.skip(f"{variant} not available here")
    hidden, weight, labels = bench_ops.logprob_inputs(N, H, V, DTYPE, DEVICE)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(hidden, weight, labels)
        else:
            hidden.grad = weight.grad = None
            fn(hidden, weight, labels).float().sum().backward()
        _sync()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("path", ["two-op", "single"])
def test_ppo(benchmark, backend, path):
    losses = bench_ops.ppo_losses(backend, N, H, V, DTYPE, DEVICE)
    if losses is None:
        pytest.skip(f"{backend} not available here")
    single_loss, two_op_loss, params = losses
    step = bench_ops.ppo_step(single_loss if path == "single" else two_op_loss, params)
    benchmark.pedantic(lambda: (step(), _sync()), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("variant", ["python-loop", "torch", "cpp", "cuda", "triton"])
def test_gae(benchmark, variant):
    b, t = (256, 4096) if DEVICE == "cuda" else (64, 1024)
    fn = bench_ops.gae_fn(variant, b, t, DEVICE, bench_ops.gae_input_sets(b, t, DEVICE))
    if fn is None:
        pytest.skip(f"{variant} not available here")
    benchmark.pedantic(lambda: (fn(), _sync()), rounds=5, warmup_rounds=1)

"""The benchmark's built-in correctness check (benchmarks/bench_ops.py): it must pass right variants and
flag wrong ones, since on a GPU it is what vouches for every timed row, competitors' included."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from rlhf_fast import ops

from conftest import backends_for

_spec = importlib.util.spec_from_file_location("bench_ops", Path(__file__).parents[1] / "benchmarks" / "bench_ops.py")
bench_ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_ops)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton on CPU tensors (Liger's too) needs the interpreter
N, H, V = 40, 24, 300
CHUNK = 128  # the check's reference upcasts the weight in chunks: 3 here, the last one partial


def _inputs():
    return bench_ops.logprob_inputs(N, H, V, torch.float32, "cpu", seed=3)


def _scaled_grad(fn, scale):
    """Same values as fn, gradients multiplied by ``scale``: the kind of bug a timing table would hide."""
    def wrong(h, w, y):
        out = fn(h, w, y)
        return out.detach() + scale * (out - out.detach())
    return wrong


@pytest.mark.parametrize("variant", ["naive", *backends_for("torch", "triton")])
def test_check_passes_correct_variants(variant):
    fn = bench_ops.logprob_variant("naive", "cpu") if variant == "naive" else (
        lambda h, w, y: ops.linear_logprobs(h, w, y, backend=variant))
    errs = bench_ops.check_logprobs(fn, *_inputs(), backward=True, k=16, n_cols=50, chunk=CHUNK)
    assert set(errs) == {"logprobs_rel_err", "dhidden_rel_err", "dweight_rel_err"}
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("bug", ["sign", "grad-scale"])
def test_check_flags_wrong_variants(bug):
    naive = bench_ops.logprob_variant("naive", "cpu")
    fn = (lambda h, w, y: -naive(h, w, y)) if bug == "sign" else _scaled_grad(naive, 0.5)
    errs = bench_ops.check_logprobs(fn, *_inputs(), backward=True, k=16, n_cols=50, chunk=CHUNK)
    key = "logprobs_rel_err" if bug == "sign" else "dhidden_rel_err"
    assert errs[key] > 0.4, errs
    if bug == "grad-scale":
        assert errs["logprobs_rel_err"] < 1e-6 and errs["dweight_rel_err"] > 0.4


def test_check_leaves_no_gradients_behind():
    hidden, weight, labels = _inputs()
    bench_ops.check_logprobs(bench_ops.logprob_variant("naive", "cpu"), hidden, weight, labels, backward=True, k=8)
    assert hidden.grad is None and weight.grad is None


def test_liger_call_matches_reference():
    """The harness's Liger call (argument order, sign, reduction="none" per-token gradients), when installed."""
    if not INTERPRET:
        pytest.skip("Liger's Triton kernels on CPU tensors need the interpreter")
    pytest.importorskip("liger_kernel")
    fn = bench_ops.logprob_variant("liger", "cpu")
    errs = bench_ops.check_logprobs(fn, *_inputs(), backward=True, k=16, n_cols=50, chunk=CHUNK)
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("variant", ["torch", "torch:kernel", *[f"{b}{k}" for b in backends_for("cpp") for k in ("", ":kernel")]])
def test_gae_rows_carry_their_check(variant):
    # ":kernel" rows call the backend directly (no input checks, no NaN guard): the check must still hold
    res = bench_ops.run_gae(variant, 3, 17, "cpu", reps=1, n_sets=2)
    assert res["advantages_rel_err"] < 1e-6 and res["returns_rel_err"] < 1e-6 and res["input_sets"] == 2


def test_gae_rows_rotate_through_their_input_sets():
    # On CUDA a row cycles through sets that overflow L2; each call must take the next set, not reuse one.
    fn = bench_ops.gae_fn("torch", 2, 9, "cpu", n_sets=3)
    assert len({s[0].data_ptr() for s in fn.sets}) == 3
    for i in range(6):
        torch.testing.assert_close(fn()[0], fn.call(i % 3)[0], rtol=0, atol=0)
    assert not torch.equal(fn.call(0)[0], fn.call(1)[0])


def test_single_pass_ppo_rows_are_checked_against_two_ops():
    res = bench_ops.run_ppo("ppo-single:torch", 48, 16, 70, torch.float32, "cpu", reps=1, chunk=20)
    errs = {k: v for k, v in res.items() if k.endswith("_vs_two_op_rel_err")}
    assert set(errs) == {"loss_vs_two_op_rel_err", "dhidden_vs_two_op_rel_err", "dweight_vs_two_op_rel_err"}
    assert max(errs.values()) < 1e-5, errs
    assert "loss_vs_two_op_rel_err" not in bench_ops.run_ppo("ppo-two-op:torch", 48, 16, 70, torch.float32, "cpu", reps=1)


def test_run_cut_short_keeps_its_rows(tmp_path, monkeypatch):
    # The JSON is rewritten after every row: a GPU call stopped at its time limit still returns what it measured.
    calls = []

    def run_isolated(case, device, reps, threads):
        calls.append(case["variant"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return bench_ops.run_case(case, device, reps)

    monkeypatch.setattr(bench_ops, "run_isolated", run_isolated)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench_ops.main(["--device", "cpu", "--ops", "gae", "--gae-rows", "2", "--gae-steps", "8", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["case"]["variant"] for r in saved["rows"]] == calls[:1] and saved["complete"] is False
    assert saved["rows"][0]["result"]["advantages_rel_err"] < 1e-6


@pytest.mark.parametrize("layout", ["dh", "dw"])
def test_accumulating_gemm_rows_are_checked(layout):
    # fp32 accumulation of exact bf16 products stays near fp32 rounding; a bf16-rounded product does not
    exact = bench_ops.run_acc("triton", layout, 40, 24, 300, "cpu", reps=1) if INTERPRET else None
    rounded = bench_ops.run_acc("cublas-bf16-add", layout, 40, 24, 300, "cpu", reps=1)
    assert rounded["c_rel_err"] > 1e-4
    if exact is not None:
        assert exact["c_rel_err"] < 1e-5 and exact["mkn"] == rounded["mkn"]

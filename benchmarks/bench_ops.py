"""Benchmark of the fused ops against the naive path and the best alternatives.

    python benchmarks/bench_ops.py --device cpu  --tokens 8192 --hidden 576 --vocab 49152
    python benchmarks/bench_ops.py --device cuda                       # issue-3 shapes, bf16

Rows: linear log-probs forward and forward+backward (naive materialized logits, torch.compile'd naive,
each rlhf_fast backend, Liger-Kernel and Cut Cross-Entropy when installed), single-pass PPO vs
linear_logprobs + ppo_policy_loss, and GAE vs the Python loop over time steps. Each variant reports the
median time and the peak extra memory over its inputs, gradients included (CUDA: allocator peak; CPU: peak RSS of a fresh
subprocess per variant, since the CPU allocator keeps no statistics). A table is printed and everything is
written as JSON to benchmarks/results/ with the machine, versions, commit and shapes.
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from rlhf_fast import ops
from rlhf_fast.ops import reference

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GAE_BYTES_PER_STEP = 4 + 4 + 1 + 4 + 4  # the fewest a GAE moves per (row, step): read r, v, mask; write adv, ret


# ------------------------------------------------------------------ environment
def environment(device: str) -> dict:
    def git(*args):
        try:
            return subprocess.check_output(["git", *args], cwd=Path(__file__).parent, text=True, stderr=subprocess.DEVNULL).strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    head = git("rev-parse", "HEAD")
    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        # BENCH_COMMIT: for a copy of the tree without .git (the lent GPU machine gets one).
        "commit": head or os.environ.get("BENCH_COMMIT"),
        "dirty": None if head is None else bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "backends": list(ops.available_backends()),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


# ------------------------------------------------------------------ timing and memory
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: str, reps: int, warmup: int = 1) -> dict:
    """Median seconds over ``reps`` calls and peak extra memory (bytes) over the inputs already allocated.

    CPU: the growth of this process's peak RSS, meaningful because each case runs in a fresh process.
    """
    base_rss = maxrss_bytes()
    for _ in range(warmup):
        fn()
    sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    if device != "cuda":
        peak = maxrss_bytes() - base_rss
    return {"time_s": statistics.median(times), "times_s": times, "peak_extra_bytes": peak}


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ------------------------------------------------------------------ linear log-prob variants
def logprob_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, weight, labels


def naive_logprobs(hidden, weight, labels):
    # what a plain trainer does: full logits in fp32 -> log_softmax -> gather
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)


def logprob_variant(name: str, device: str):
    """fn(hidden, weight, labels) -> per-token log-probs [N], or None if unavailable here."""
    if name == "naive":
        return naive_logprobs
    if name == "naive-compile":
        return torch.compile(naive_logprobs)
    if name in ("torch", "triton"):
        if name not in ops.available_backends() or (name == "triton" and device != "cuda"):
            return None
        return lambda h, w, y: ops.linear_logprobs(h, w, y, backend=name)
    if name == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return None
        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
        return lambda h, w, y: -loss(w, h, y)
    if name in ("cce", "cce-exact"):
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError:
            return None
        # CCE's default skips backward blocks whose every |dz| < bf16 eps / 32 ("gradient filtering"); with
        # filter_eps=None its gradients are exact, as the other variants' are
        kw = {"filter_eps": None} if name == "cce-exact" else {}
        return lambda h, w, y: -linear_cross_entropy(h, w, y, reduction="none", **kw)
    raise ValueError(name)


def rel_err(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_logprobs(fn, hidden, weight, labels, backward: bool, k: int = 64, n_cols: int = 1024, chunk: int = 16384) -> dict:
    """‖out - ref‖ / ‖ref‖ of a variant at the benchmarked shape against float64 on materialized logits.

    Only the first k tokens carry gradient, so the reference needs k x V logits, not N x V: log-probs of
    those tokens, their dhidden rows, and dweight on n_cols random vocabulary rows (weight is upcast
    ``chunk`` rows at a time, not all at once). Guards the timed rows
    against a variant that is fast because it is wrong (sign, argument order, dropped gradient scale).
    """
    k = min(k, hidden.shape[0])
    gen = torch.Generator(device="cpu").manual_seed(1)
    g = torch.randn(k, generator=gen, dtype=torch.float64).to(hidden.device)
    cols = torch.randperm(weight.shape[0], generator=gen)[:n_cols].to(hidden.device)
    h64 = hidden.detach()[:k].double()
    logp = torch.log_softmax(torch.cat([h64 @ w.double().T for w in weight.detach().split(chunk)], 1), -1)
    ref_lp = logp.gather(1, labels[:k, None]).squeeze(1)
    out = {"logprobs_rel_err": rel_err(fn(hidden, weight, labels)[:k].detach(), ref_lp)}
    if backward:
        dz = -g[:, None] * logp.exp()  # d(g . log p_y)/dz = g (onehot - p)
        dz.scatter_add_(1, labels[:k, None], g[:, None])
        ref_dh = sum(dz[:, c0:c0 + chunk] @ w.double() for c0, w in zip(range(0, weight.shape[0], chunk), weight.detach().split(chunk)))
        ref_dw = dz[:, cols].T @ h64
        hidden.grad = weight.grad = None
        (fn(hidden, weight, labels)[:k].double() * g).sum().backward()
        out["dhidden_rel_err"] = rel_err(hidden.grad[:k], ref_dh)
        out["dweight_rel_err"] = rel_err(weight.grad[cols], ref_dw)
        hidden.grad = weight.grad = None
    return out


def run_logprobs(name, mode, n, h, v, dtype, device, reps):
    fn = logprob_variant(name, device)
    if fn is None:
        return None
    hidden, weight, labels = logprob_inputs(n, h, v, dtype, device)
    g = torch.randn(n, device=device)

    def step():
        out = fn(hidden, weight, labels)
        if mode == "fwd+bwd":
            out.float().backward(g)
            hidden.grad = weight.grad = None  # dropped after, not before: peak extra memory includes the gradients

    if mode == "fwd":
        with torch.no_grad():
            timing = measure(step, device, reps)
    else:
        timing = measure(step, device, reps)
    # After timing: on CPU the peak-RSS measure needs this process's first full-size call to be a timed one.
    return {**timing, **check_logprobs(fn, hidden, weight, labels, backward=mode == "fwd+bwd")}


# ------------------------------------------------------------------ PPO: single pass vs two ops
def ppo_losses(backend, n, h, v, dtype, device, chunk=None):
    """(single_loss, two_op_loss, (hidden, weight)): no-argument PPO losses on one batch, or None if the backend
    cannot run here. Single pass: linear_ppo_loss; two ops: linear_logprobs (+ entropy) then ppo_policy_loss."""
    if backend not in ops.available_backends() or (backend == "triton" and device != "cuda"):
        return None
    hidden, weight, labels = logprob_inputs(n, h, v, dtype, device)
    b = 8 if n % 8 == 0 else 1
    hidden3, labels2 = hidden.detach().view(b, n // b, h).requires_grad_(), labels.view(b, n // b)
    with torch.no_grad():
        old = ops.linear_logprobs(hidden3, weight, labels2, backend=backend) + 0.05 * torch.randn(b, n // b, device=device)
    adv = torch.randn(b, n // b, device=device)
    mask = torch.rand(b, n // b, device=device) < 0.9

    def single_loss():
        return ops.linear_ppo_loss(hidden3, weight, labels2, old, adv, mask, entropy_coef=0.01, backend=backend,
                                   chunk_size=chunk)[0]

    def two_op_loss():
        lp, ent = ops.linear_logprobs(hidden3, weight, labels2, return_entropy=True, backend=backend)
        return ops.ppo_policy_loss(lp, old, adv, mask)[0] - 0.01 * ops.masked_mean(ent, mask)

    return single_loss, two_op_loss, (hidden3, weight)


def ppo_step(loss_fn, params):
    """One forward+backward; gradients dropped after, not before, so that peak memory includes them."""
    def step():
        loss_fn().backward()
        for p in params:
            p.grad = None
    return step


def run_ppo(name, n, h, v, dtype, device, reps, chunk=None):
    losses = ppo_losses(name.split(":")[1], n, h, v, dtype, device, chunk)
    if losses is None:
        return None
    single_loss, two_op_loss, params = losses
    is_single = name.startswith("ppo-single")
    timing = measure(ppo_step(single_loss if is_single else two_op_loss, params), device, reps)
    if not is_single:
        return timing
    # The single pass must equal the two-op composition (itself checked against float64 in the logprobs rows).
    def loss_and_grads(fn):
        loss = fn()
        return (loss.detach(), *torch.autograd.grad(loss, params))

    got, want = loss_and_grads(single_loss), loss_and_grads(two_op_loss)
    names = ("loss", "dhidden", "dweight")
    return {**timing, **{f"{k}_vs_two_op_rel_err": rel_err(a, b.double()) for k, a, b in zip(names, got, want)}}


# ------------------------------------------------------------------ GAE
def gae_input_sets(b: int, t: int, device: str) -> int:
    """Input sets a GAE row cycles through: on CUDA enough that they, with their outputs, fill 4x the L2 cache.

    At B=256, T=4096 one set with its outputs is 17 MiB, well inside an H100's 50 MB L2: timed on one set,
    the kernel would read its inputs from L2, not from the memory whose bandwidth bounds it.
    """
    if device != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 64 << 20)
    return max(1, min(64, -(-4 * l2 // (b * t * GAE_BYTES_PER_STEP))))


def gae_fn(name, b, t, device, n_sets: int = 1):
    """A no-argument GAE call that takes the next of ``n_sets`` fresh input sets, or None if the variant cannot
    run here. ``fn.call(i)`` runs on set i, ``fn.sets`` holds the (rewards, values, mask) sets.

    "<backend>" is the public op (input checks, and the output NaN guard: a device-to-host sync);
    "<backend>:kernel" the backend alone on prepared inputs, what the bandwidth time bounds;
    "triton:kernel@<n>" the Triton kernel with n rows per program (its planner's alternative, see kernels/gae.py).
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    sets = [(torch.randn(b, t, generator=g).to(device), torch.randn(b, t, generator=g).to(device),
             (torch.rand(b, t, generator=g) < 0.9).to(device)) for _ in range(n_sets)]
    backend, _, part = name.partition(":")
    part, _, rows_per_program = part.partition("@")
    if backend == "python-loop":
        def call(i):
            return reference.gae(*sets[i], 1.0, 0.95)
    elif backend not in ops.available_backends() or (backend in ("triton", "cuda")) != (device == "cuda") or (
            backend == "cpp" and device != "cpu"):
        return None
    elif rows_per_program:
        from rlhf_fast_kernels.gae import gae as triton_gae

        def call(i):
            return triton_gae(*sets[i], 1.0, 0.95, block_b=int(rows_per_program))
    elif part == "kernel":
        from rlhf_fast.ops import _backend, _triton

        raw = {"cpp": lambda *a: _backend._ext().gae_cpu(*a), "cuda": lambda *a: _backend._ext().gae_cuda(*a),
               "triton": _triton.gae, "torch": reference.gae}[backend]

        def call(i):
            return raw(*sets[i], 1.0, 0.95)
    else:
        def call(i):
            return ops.gae(*sets[i], gamma=1.0, lam=0.95, backend=backend)
    turn = itertools.count()

    def fn():
        return call(next(turn) % n_sets)

    fn.call, fn.sets = call, sets
    return fn


def graphed(fn):
    """One call per input set, captured in a single CUDA graph: microsecond-scale kernels timed without host
    launch gaps. Returns (replay, calls per replay); each call keeps its own outputs (none left in L2 for the next)."""
    n = len(fn.sets)
    for i in range(n):
        fn.call(i)  # compile / autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn.call(i) for i in range(n)]

    def replay():
        graph.replay()
        return outs

    return replay, n


def run_gae(name, b, t, device, reps, n_sets: int | None = None):
    fn = gae_fn(name, b, t, device, gae_input_sets(b, t, device) if n_sets is None else n_sets)
    if fn is None:
        return None
    timed, per_replay = graphed(fn) if device == "cuda" and ":kernel" in name else (fn, 1)
    timing = measure(timed, device, reps)
    timing["time_s"] /= per_replay
    timing["times_s"] = [x / per_replay for x in timing["times_s"]]
    adv, ret = fn.call(0)
    rows = slice(0, 4)  # the per-row oracle is a scalar Python loop: a few rows are plenty
    r, v, m = (x[rows].double().cpu() for x in fn.sets[0])
    ref_adv, ref_ret = reference.gae_per_row(r, v, m, 1.0, 0.95)
    return {**timing, "input_sets": len(fn.sets), "advantages_rel_err": rel_err(adv[rows].cpu(), ref_adv),
            "returns_rel_err": rel_err(ret[rows].cpu(), ref_ret)}


# ------------------------------------------------------------------ accumulating GEMM: C (fp32) += A @ B (bf16)
def acc_operands(layout: str, n: int, h: int, v: int, device: str):
    """(c fp32, a, b bf16) shaped as the Triton backends accumulate: "dh" is dhidden += dz @ weight[chunk]
    (linear_logprobs' backward: dz [N, Vc] row-major), "dw" is dweight += dz.T @ hidden[group] (the
    single-pass loss: dz.T [V, G] column-major), with Vc and G as the kernels pick them."""
    from rlhf_fast_kernels.fused_linear_loss import plan
    from rlhf_fast_kernels.linear_logprobs import vocab_chunk

    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    if layout == "dh":
        k = vocab_chunk(n, h, v, 2)
        a = rand(n, k).to(torch.bfloat16)
    else:
        k = plan(n, v, 2)[1]
        a = rand(k, v).to(torch.bfloat16).T
    return rand(a.shape[0], h), a, rand(k, h).to(torch.bfloat16)


def acc_variant(name: str):
    """fn(c, a, b) -> c after c += a @ b: our Triton kernel, cuBLAS with an fp32 output (torch's out_dtype),
    or a bf16 product added to c (a temporary of c's shape, and the product rounded to bf16)."""
    if name == "triton":
        from rlhf_fast_kernels.matmul import matmul_acc

        return matmul_acc
    if name == "cublas-out-dtype":
        return lambda c, a, b: torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
    if name == "cublas-bf16-add":
        return lambda c, a, b: c.add_(a @ b)
    raise ValueError(name)


def run_acc(name, layout, n, h, v, device, reps):
    fn = acc_variant(name)
    c, a, b = acc_operands(layout, n, h, v, device)
    timing = measure(lambda: fn(c, a, b), device, reps)
    c.normal_()
    rows = torch.randperm(c.shape[0], device=device)[:64]
    want = c[rows].double() + a[rows].double() @ b.double()
    return {**timing, "mkn": [a.shape[0], a.shape[1], b.shape[1]], "c_rel_err": rel_err(fn(c, a, b)[rows], want)}


def run_case(case: dict, device: str, reps: int):
    kind = case["kind"]
    if kind == "logprobs":
        return run_logprobs(case["variant"], case["mode"], case["n"], case["h"], case["v"], DTYPES[case["dtype"]], device, reps)
    if kind == "ppo":
        return run_ppo(case["variant"], case["n"], case["h"], case["v"], DTYPES[case["dtype"]], device, reps, case.get("chunk"))
    if kind == "acc":
        return run_acc(case["variant"], case["layout"], case["n"], case["h"], case["v"], device, reps)
    return run_gae(case["variant"], case["b"], case["t"], device, max(reps, 50))  # ms-scale: more reps for a steady median


def run_isolated(case: dict, device: str, reps: int, threads: int | None):
    """CPU: run one case in a fresh interpreter so that its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--_worker", json.dumps(case), "--device", device, "--reps", str(reps)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker(case: dict, device: str, reps: int):
    print(json.dumps(run_case(case, device, reps)))


# ------------------------------------------------------------------ CUDA ceilings
def cuda_ceilings() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = measure(lambda: a @ b, "cuda", reps=20, warmup=3)["time_s"]
    x = torch.randint(0, 256, (1 << 30,), dtype=torch.uint8, device="cuda")  # random bytes: never time on zeros
    y = torch.empty_like(x)
    cp = measure(lambda: y.copy_(x), "cuda", reps=20, warmup=3)["time_s"]
    return {"bf16_matmul_tflops": 2 * 8192**3 / mm / 1e12, "copy_bandwidth_gbs": 2 * x.numel() / cp / 1e9}


def flops(case: dict, result: dict | None = None) -> float | None:
    if case["kind"] == "logprobs":
        # Materialized logits: logits, dhidden, dweight. Fused ones recompute the logits in the backward (Liger
        # too with reduction="none": its per-token gradient scale is known only then).
        passes = 1 if case["mode"] == "fwd" else (3 if case["variant"] in ("naive", "naive-compile") else 4)
    elif case["kind"] == "ppo":
        passes = 3 if case["variant"].startswith("ppo-single") else 4
    elif case["kind"] == "acc" and result and "mkn" in result:
        m, k, n = result["mkn"]
        return 2.0 * m * k * n
    else:
        return None
    return 2.0 * passes * case["n"] * case["h"] * case["v"]


# ------------------------------------------------------------------ main
def build_cases(args) -> list[dict]:
    cases = []
    variants = (["naive", "naive-compile", "torch", "triton", "liger", "cce", "cce-exact"] if args.device == "cuda"
                else ["naive", "torch"])
    if args.compile and args.device == "cpu":
        variants.insert(1, "naive-compile")
    if args.variants:
        variants = [v for v in variants if v in args.variants]
    modes = ["fwd", "fwd+bwd"] if args.device == "cuda" else ["fwd+bwd"]
    for n in args.tokens:
        for v in args.vocab:
            for mode in modes:
                for var in variants:
                    cases.append({"kind": "logprobs", "variant": var, "mode": mode, "n": n, "h": args.hidden, "v": v, "dtype": args.dtype})
            for backend in ("torch", "triton") if args.ppo else ():
                for var in ("ppo-two-op", "ppo-single"):  # two-op first: the single pass's ratio is its speed-up
                    cases.append({"kind": "ppo", "variant": f"{var}:{backend}", "n": n, "h": args.hidden, "v": v, "dtype": args.dtype})
                # Other logits chunks C: the single pass's dz group G takes the rest of its buffer budget, and
                # each group reads and writes the fp32 V x H dweight accumulator once.
                for chunk in args.ppo_chunks or ():
                    cases.append({"kind": "ppo", "variant": f"ppo-single:{backend}", "chunk": chunk, "n": n, "h": args.hidden, "v": v, "dtype": args.dtype})
            # The accumulating GEMM of both Triton paths, ours against cuBLAS (bf16 operands, fp32 C)
            for layout in ("dh", "dw") if args.device == "cuda" else ():
                for var in ("triton", "cublas-out-dtype", "cublas-bf16-add"):
                    cases.append({"kind": "acc", "variant": var, "layout": layout, "n": n, "h": args.hidden, "v": v})
    gae_variants = (["python-loop", "cuda", "cuda:kernel", "triton", "triton:kernel", "triton:kernel@2"] if args.device == "cuda"
                    else ["python-loop", "torch", "cpp", "cpp:kernel"])
    for var in gae_variants:
        cases.append({"kind": "gae", "variant": var, "b": args.gae_rows, "t": args.gae_steps})
    return [c for c in cases if c["kind"] in args.ops]


def fmt_bytes(b):
    return "-" if b is None else f"{b / 2**20:,.0f} MiB"


def label(case: dict) -> str:
    return case["kind"] + (f" C={case['chunk']}" if case.get("chunk") else "")


def print_table(rows, ceilings):
    print(f"\n{'op':<10} {'variant':<18} {'mode':<8} {'shape':<26} {'time':>10} {'peak extra':>12} {'TFLOP/s':>8} {'% mm':>6} {'rel err':>8}  ratio")
    baseline = {}
    for r in rows:
        c, res = r["case"], r["result"]
        backend = c["variant"].split(":")[1] if c["kind"] == "ppo" else None  # PPO rows: within one backend
        mode = c.get("mode") or c.get("layout", "")  # accumulating-GEMM rows: which backward product
        key = (c["kind"], mode, c.get("n"), c.get("v"), c.get("b"), backend)
        shape = f"N={c['n']} H={c['h']} V={c['v']}" if "n" in c else f"B={c['b']} T={c['t']}"
        if res and "mkn" in res:
            shape = "M={} K={} N={}".format(*res["mkn"])
        if res is None or "error" in res:
            print(f"{label(c):<10} {c['variant']:<18} {mode:<8} {shape:<26} {'n/a' if res is None else 'error: ' + res['error'][:40]:>10}")
            continue
        baseline.setdefault(key, res)
        tf = f"{r['tflops']:.2f}" if r.get("tflops") else "-"
        pct = f"{100 * r['tflops'] / ceilings['bf16_matmul_tflops']:.0f}" if r.get("tflops") and ceilings else "-"
        ratio = baseline[key]["time_s"] / res["time_s"]
        mem = res["peak_extra_bytes"]
        base_mem = baseline[key]["peak_extra_bytes"]
        mem_ratio = f" mem {mem / base_mem:.2f}x" if mem is not None and base_mem else ""
        bw = f" {res['time_s'] / r['bandwidth_time_s']:.1f}x bandwidth time" if r.get("bandwidth_time_s") else ""
        errs = [x for k, x in res.items() if k.endswith("_rel_err")]
        err = f"{max(errs):.1e}" if errs else "-"
        print(f"{label(c):<10} {c['variant']:<18} {mode:<8} {shape:<26} {res['time_s'] * 1e3:>8.1f}ms {fmt_bytes(mem):>12} {tf:>8} {pct:>6} {err:>8}  {ratio:.2f}x speed{mem_ratio}{bw}")
    print("(ratio: speed and memory relative to the first row of the same op/mode/shape; rel err: worst of value and\n"
          " gradients against float64 on materialized logits, first 64 tokens; GAE: the per-row recursion; single-pass\n"
          " PPO: loss and gradients against the two-op path; acc: C += A @ B on 64 rows against float64)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, nargs="+", help="N (default: cpu 8192; cuda 4096 16384)")
    p.add_argument("--hidden", type=int, help="H (default: cpu 576; cuda 4096)")
    p.add_argument("--vocab", type=int, nargs="+", help="V (default: cpu 49152; cuda 128256 151936)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: cpu fp32, cuda bf16")
    p.add_argument("--gae-rows", type=int, help="GAE B (default: cpu 64; cuda 256)")
    p.add_argument("--gae-steps", type=int, help="GAE T (default: cpu 1024; cuda 4096)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default: cpu 3, cuda 20)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd naive on CPU (slow to compile)")
    p.add_argument("--ppo", action=argparse.BooleanOptionalAction, default=None, help="single-pass PPO vs two ops (default: on for cuda)")
    p.add_argument("--ops", nargs="+", choices=["logprobs", "ppo", "acc", "gae"], default=["logprobs", "ppo", "acc", "gae"],
                   help="which tables to run (split a long GPU run over several calls)")
    p.add_argument("--ppo-chunks", type=int, nargs="+", help="extra single-pass PPO rows at these token chunk sizes")
    p.add_argument("--variants", nargs="+", help="linear log-prob variants to keep (default: all available)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/bench_ops_<device>_<date>.json)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (1 gives steadier CPU ratios on a shared machine)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if args.reps is None:
        args.reps = 20 if cuda else 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._worker:
        return worker(json.loads(args._worker), args.device, args.reps)
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    args.ppo = cuda if args.ppo is None else args.ppo
    args.tokens = args.tokens or ([4096, 16384] if cuda else [8192])
    args.hidden = args.hidden or (4096 if cuda else 576)
    args.vocab = args.vocab or ([128256, 151936] if cuda else [49152])
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.gae_rows = args.gae_rows or (256 if cuda else 64)
    args.gae_steps = args.gae_steps or (4096 if cuda else 1024)

    env = environment(args.device)
    ceilings = cuda_ceilings() if cuda else None
    out = args.out or RESULTS / f"bench_ops_{args.device}_{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    run_args = {k: v for k, v in vars(args).items() if k not in ("_worker", "out")}
    cases = build_cases(args)
    rows = []

    def save():  # after every row: a run cut short (a time limit, Ctrl-C) keeps what it measured
        out.write_text(json.dumps({"environment": env, "ceilings": ceilings, "args": run_args, "rows": rows,
                                   "complete": len(rows) == len(cases)}, indent=1, default=str))

    save()
    for case in cases:
        print(f"running {case}", file=sys.stderr, flush=True)
        if cuda:
            try:
                res = run_case(case, "cuda", args.reps)
            except Exception as e:  # a failing competitor must not sink the whole table
                res = {"error": f"{type(e).__name__}: {e}"}
            torch.cuda.empty_cache()
        else:
            res = run_isolated(case, "cpu", args.reps, args.threads)
        row = {"case": case, "result": res}
        f = flops(case, res)
        if f and res and "time_s" in res:
            row["tflops"] = f / res["time_s"] / 1e12
        if case["kind"] == "gae" and ceilings and res and "time_s" in res:
            row["bandwidth_time_s"] = case["b"] * case["t"] * GAE_BYTES_PER_STEP / (ceilings["copy_bandwidth_gbs"] * 1e9)
        rows.append(row)
        save()
    print_table(rows, ceilings)
    print(f"wrote {out}")

if __name__ == "__main__":
    main()

"""Decode speed of the demo's policy (SmolLM2-135M-Instruct) with transformers' ``generate``: dynamic KV cache
vs static cache vs static cache with a compiled forward, against the FLOP floor; and with the dynamic cache,
transformers' multinomial sampling vs drawing by inversion (``rollout.sample_by_inversion``, what rollouts use),
with each sampler's cost per decode step timed apart on [batch x vocab] scores; and the linear layers on oneDNN-packed
weights (``rollout.packed_linears``, rollouts' default on the CPU; the copy is made inside each timed call).

Each variant runs in its own process (compile caches and peak memory stay separate), sampling ``--new`` tokens
(min = max, so every variant decodes the same number of steps) for ``--batch`` random prompts of ``--prompt``
tokens; the first call (warm-up, compilation) is reported apart from the median of the next ``--reps``.
FLOP floor: 2 x parameters x batch per decode step (attention over <= 100 positions adds < 1 %), divided by the
machine's measured fp32 matmul rate (one [batch x H] @ [H x 4H]-shaped GEMM loop, same threads).

  python benchmarks/bench_generate.py --variants dynamic,static,static+compile
  python benchmarks/bench_generate.py --variants dynamic,dynamic+inversion --out benchmarks/results/generate_smollm2_cpu_sampler.json
  python benchmarks/bench_generate.py --variants dynamic+inversion,dynamic+inversion+packed --out benchmarks/results/generate_smollm2_cpu_packed.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("dynamic", "dynamic+inversion", "dynamic+inversion+packed", "static", "static+compile")


def sampler_costs(batch: int, vocab: int, reps: int = 50) -> dict:
    """ms per decode step of each way to draw the next tokens from [batch, vocab] scores (median of ``reps``)."""
    import torch

    from rlhf_fast.rollout import sample_by_inversion

    scores = torch.randn(batch, vocab) * 3
    out = {}
    for name, fn in (("multinomial", lambda: torch.multinomial(torch.softmax(scores, -1), 1)),
                     ("inversion", lambda: sample_by_inversion(scores, 1.0))):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
        out[name] = statistics.median(times)
    return out


def child(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from rlhf_fast.models import smollm2_path
    from rlhf_fast.rollout import packed_linears

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.randint(100, 40000, (args.batch, args.prompt))
    kw = dict(do_sample=True, max_new_tokens=args.new, min_new_tokens=args.new, temperature=1.0, top_k=0, top_p=1.0,
              pad_token_id=0)
    extra = {}
    if args.variant.startswith("static"):
        kw["cache_implementation"] = "static"
    if args.variant == "static+compile":
        model.forward = torch.compile(model.forward, dynamic=False)
    if args.variant.startswith("dynamic+inversion"):  # greedy search whose logits processor draws the token, as rollouts do
        from transformers import LogitsProcessorList

        from rlhf_fast.rollout import _InversionSampler

        kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        extra["logits_processor"] = LogitsProcessorList([_InversionSampler(1.0)])
    cfg = GenerationConfig(**kw)
    packed = args.variant.endswith("+packed")  # oneDNN-packed linear weights, copied at each call as rollouts do
    times = []
    for _ in range(args.reps + 1):
        t = time.perf_counter()
        with torch.no_grad(), packed_linears(model, args.batch) if packed else contextlib.nullcontext():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg, **extra)
        times.append(time.perf_counter() - t)
    sampler_ms = sampler_costs(args.batch, model.config.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    h = model.config.hidden_size
    a, b = torch.randn(args.batch * 4, h), torch.randn(h, 4 * h)  # a decode-shaped GEMM: the rate the floor assumes
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < 2.0:
        a @ b
        n += 1
    gflops = 2 * a.shape[0] * h * 4 * h * n / (time.perf_counter() - t) / 1e9
    step = statistics.median(times[1:]) / args.new
    floor = 2 * n_params * args.batch / 1e9 / gflops
    return {"variant": args.variant, "first_call_s": times[0], "calls_s": times[1:], "ms_per_step": 1e3 * step,
            "tokens_per_s": args.batch / step, "gemm_gflops": gflops, "floor_ms_per_step": 1e3 * floor,
            "ratio_to_floor": step / floor, "sampler_ms_per_step": sampler_ms, "params": n_params, "threads": torch.get_num_threads(),
            "load_average": os.getloadavg()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=16, help="the demo's responses per iteration")
    ap.add_argument("--prompt", type=int, default=30)
    ap.add_argument("--new", type=int, default=40, help="the demo's max_new_tokens")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "generate_smollm2_cpu.json"))
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    import torch
    import transformers

    results = {}
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # as the CLI: no spinning threads
    for v in args.variants.split(","):
        if v not in VARIANTS:
            ap.error(f"--variants: unknown {v!r}; choose among {', '.join(VARIANTS)}")
        cmd = [sys.executable, __file__, "--variant", v] + [f"--{k}={getattr(args, k)}" for k in ("batch", "prompt", "new", "reps")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            results[v] = {"error": "\n".join(proc.stderr.splitlines()[-10:])}
            print(f"{v}: failed\n{results[v]['error']}", file=sys.stderr)
            continue
        r = results[v] = json.loads(line[7:])
        print(f"{v:15s} first call {r['first_call_s']:6.1f} s, then {r['ms_per_step']:6.1f} ms/step = {r['tokens_per_s']:6.1f} tok/s, "
              f"{r['ratio_to_floor']:.1f}x the FLOP floor ({r['floor_ms_per_step']:.0f} ms at {r['gemm_gflops']:.0f} GFLOP/s), "
              f"sampler ms/step {r['sampler_ms_per_step']}, load {r['load_average'][0]:.2f}", flush=True)
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    info = {"benchmark": "decode speed of SmolLM2-135M-Instruct with transformers generate (fp32, CPU)",
            "settings": {k: getattr(args, k) for k in ("batch", "prompt", "new", "reps")}, "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_count": os.cpu_count(), "commit": git, "results": results}
    Path(args.out).write_text(json.dumps(info, indent=1) + "\n")
    print(args.out)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

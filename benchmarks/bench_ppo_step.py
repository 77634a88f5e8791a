"""One PPO iteration per variant: generation, scoring and update timed separately, and the memory of each model.

The model is random-weight (speed does not depend on the weights), shaped from the command line or a preset,
and runs through the real trainer (``RLTrainer.run_unit``), so the numbers are the trainer's own. Each variant
(``VARIANTS``: kernels, what trains, trunk sharing) runs in a fresh subprocess so its peak memory is its own:
peak RSS (``getrusage``) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA; plus the parameter bytes that the
policy, the reference and the critic each hold beyond what they share. JSON goes to ``benchmarks/results/``.

  python benchmarks/bench_ppo_step.py --preset smollm2-135m --batch 8 --prompt-len 40 --response-len 48
  python benchmarks/bench_ppo_step.py --variants today,shared,lean --batch 16 --micro-batch 8 --ppo-epochs 2 --response-len 40
  python benchmarks/bench_ppo_step.py --variants full,top,lora --share-critic        # memory per configuration
  python benchmarks/bench_ppo_step.py --preset qwen2.5-1.5b --device cuda --batch 8 --response-len 1024
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRESETS = {  # architecture shapes only (random weights)
    "smollm2-135m": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(arch="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True),
}
TOP = "top-layers"  # stands for --top-layers in VARIANTS
VARIANTS = {  # name -> config overrides (on top of the command line's)
    "fused": {},  # rlhf_fast.ops, all weights train
    "eager": {"kernels": "eager"},  # full-logits PyTorch (rlhf_fast.ops.reference)
    # top layers train; a separate critic trains the same top layers (critic.trainable_layers; dropped with --share-critic)
    "today": {"model.trainable_layers": TOP, "critic.trainable_layers": TOP, "model.share_frozen_trunk": False,
              "generation.share_prefix": False, "generation.packed_weights": False,
              "generation.keep_last_hidden": False},  # deep copies, full forwards, every prompt token per row
    "shared": {"model.trainable_layers": TOP, "critic.trainable_layers": TOP, "model.share_frozen_trunk": True,
               "generation.keep_hidden": "false", "generation.share_prefix": False,
               "generation.packed_weights": False},  # the frozen bottom shared, run once per scoring micro-batch
    # + the bottom's output and the policy's last hidden states kept from sampling, the shared prompt prefix once
    # (sampling and the top layers), packed decode weights on the CPU
    "lean": {"model.trainable_layers": TOP, "critic.trainable_layers": TOP, "model.share_frozen_trunk": True},
    "full": {},
    "top": {"model.trainable_layers": TOP},
    "lora": {"model.lora.enabled": True},
}
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")


def constant_reward(prompts, responses):
    """Rewards do not matter for speed; a fixed pattern keeps advantages non-trivial."""
    return [float(i % 3) - 1.0 for i in range(len(responses))]


def build_model_dir(shape: dict, out: Path, max_positions: int) -> None:
    """Random-weight model + a small BPE tokenizer (its ids are all < vocab_size) saved to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    sys.path.insert(0, str(HERE.parent / "tests"))
    from ppo_tiny import make_tokenizer

    tok = make_tokenizer(out)
    cls = Qwen2Config if shape["arch"] == "qwen2" else LlamaConfig
    cfg = cls(**{k: shape[k] for k in SHAPE_KEYS}, tie_word_embeddings=shape["tie_word_embeddings"], max_position_embeddings=max_positions,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.tie_weights()
    model.save_pretrained(out)


def write_prompts(path: Path, n: int, prompt_len: int, model_dir: Path) -> None:
    """``n`` prompts of about ``prompt_len`` tokens once the chat template is applied."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    words = "rain bus late coffee phone cold work dog train rent noise queue".split()
    with open(path, "w") as f:
        for i in range(n):
            text = words[i % len(words)]
            while True:
                ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
                if len(ids) >= prompt_len:
                    break
                text += " " + words[(i + len(text)) % len(words)]
            f.write(json.dumps({"prompt": text, "split": "train"}) + "\n")


def params_mb(trainer) -> dict:
    """Parameter MB each model holds beyond the policy's (storage counted once: shared or tied weights are free)."""

    def storages(*modules):
        return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in modules if m is not None for p in m.parameters()}

    policy = storages(trainer.policy)
    ref = storages(trainer.ref, trainer.ref_top)  # a full copy, or only the top layers (None: LoRA's adapters off)
    critic = storages(trainer.critic)
    extra = lambda d: sum(v for k, v in d.items() if k not in policy) / 2**20  # noqa: E731
    return {"policy": sum(policy.values()) / 2**20, "reference": extra(ref), "critic": extra(critic)}


def child(args) -> dict:
    """Run in a fresh process: build, warm up, time one iteration of one variant."""
    import torch

    sys.path.insert(0, str(HERE))
    from rlhf_fast.checkpoint import StopRequest
    from rlhf_fast.config import load_config
    from rlhf_fast.trainers.ppo import RLTrainer

    with tempfile.TemporaryDirectory() as run_dir:
        tmp = Path(args.workdir)
        cfg = load_config(None, {
            "model.policy": str(tmp / "model"), "output_dir": run_dir, "device": args.device,
            "model.bf16": args.bf16, "model.compile": args.compile, "critic.share_backbone": args.share_critic,
            "reward.sources": [{"spec": "bench_ppo_step:constant_reward"}],
            "data.prompt_file": str(tmp / "prompts.jsonl"), "data.max_prompt_length": args.prompt_len + 16,
            "generation.max_new_tokens": args.response_len, "ppo.batch_size": args.batch, "ppo.minibatch_size": args.batch,
            "ppo.micro_batch_size": args.micro_batch, "ppo.ppo_epochs": args.ppo_epochs, "ppo.kl_estimator": args.kl_estimator,
            "progress_bar": False, "num_samples_logged": 0, "threads": args.threads,
        } | {k: args.top_layers if v == TOP else v for k, v in VARIANTS[args.variant].items()
             if not (args.share_critic and k == "critic.trainable_layers")})
        trainer = RLTrainer(cfg)
        dev = trainer.device
        rows = []
        with StopRequest() as stop:
            for i in range(args.warmup + args.reps):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(dev)
                rows.append(trainer.run_unit(stop))
        timed = rows[args.warmup:]
        # the median iteration (by total time) and, per phase, the median over the timed iterations
        m = dict(sorted(timed, key=lambda r: r["time/iteration"])[len(timed) // 2])
        m |= {k: statistics.median(r[k] for r in timed) for k in ("time/generate", "time/score", "time/update", "time/iteration")}
        n_seq_tokens = args.batch * (args.prompt_len + m["response/length"])  # approximate (prompts vary by a few tokens)
        n_resp = args.batch * m["response/length"]
        out = {
            "variant": args.variant,
            "time_s": {"generate": m["time/generate"], "score": m["time/score"], "update": m["time/update"], "iteration": m["time/iteration"]},
            "tokens_per_s": {"generate": n_resp / m["time/generate"], "score": n_seq_tokens / m["time/score"],
                             "update": args.ppo_epochs * n_seq_tokens / m["time/update"], "iteration": n_resp / m["time/iteration"]},
            "iterations_s": [r["time/iteration"] for r in timed],
            "response_length_mean": m["response/length"],
            "loss_total": m.get("loss/total"),
            "params_mb": params_mb(trainer),
        }
        if dev.type == "cuda":
            out["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
            out["peak_memory_kind"] = "torch.cuda.max_memory_allocated over the timed iteration"
        else:
            import resource

            out["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out["peak_memory_kind"] = "peak RSS of the process (getrusage)"
        return out


def load() -> str:
    """uptime's 1/5/15-minute load averages: the machine may be shared."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    for k in SHAPE_KEYS:
        ap.add_argument("--" + k.replace("_", "-"), type=int, help="override the preset's " + k)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the whole batch")
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--response-len", type=int, default=48)
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--kl-estimator", default="k1")
    ap.add_argument("--bf16", default="auto")
    ap.add_argument("--compile", default="false", help="auto|true|false (false keeps compile time out of short runs)")
    ap.add_argument("--top-layers", type=int, default=8, help="layers that train in the today, lean and top variants")
    ap.add_argument("--share-critic", action="store_true", help="value head on the policy backbone (no critic copy)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    ap.add_argument("--reps", type=int, default=3, help="timed iterations: each phase's median is reported")
    ap.add_argument("--variants", default="fused,eager", help=f"comma-separated among {', '.join(VARIANTS)}")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ppo_step_<preset>_<device>.json)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.micro_batch = args.micro_batch or args.batch
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}; choose among {', '.join(VARIANTS)}")

    if args.variant:  # the child process
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0

    import torch

    shape = dict(PRESETS[args.preset])
    shape |= {k: getattr(args, k) for k in SHAPE_KEYS if getattr(args, k) is not None}
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    results = {}
    workdir = tempfile.TemporaryDirectory()  # the model is built once, here, so no child's peak memory includes building it
    build_model_dir(shape, Path(workdir.name) / "model", args.prompt_len + args.response_len + 64)
    write_prompts(Path(workdir.name) / "prompts.jsonl", args.batch * 4, args.prompt_len, Path(workdir.name) / "model")
    args.workdir = workdir.name
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", variant]
        for k, v in vars(args).items():
            if k in ("variant", "shape", "variants", "out", "preset", "share_critic") or k in SHAPE_KEYS or v is None:
                continue
            cmd += ["--" + k.replace("_", "-"), str(device if k == "device" else v)]
        cmd += ["--share-critic"] * args.share_critic
        t0 = time.time()
        # PASSIVE: idle OpenMP threads sleep rather than spin (as the CLI sets it), so a shared CPU does not stall
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
                   OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
            results[variant] = {"error": tail}
            print(f"{variant}: failed\n{tail}", file=sys.stderr)
            continue
        results[variant] = json.loads(line[7:])
        r = results[variant]
        print(f"{variant:6s} generate {r['time_s']['generate']:7.2f}s  score {r['time_s']['score']:7.2f}s  update {r['time_s']['update']:7.2f}s  "
              f"| tok/s gen {r['tokens_per_s']['generate']:8.1f} score {r['tokens_per_s']['score']:8.1f} update {r['tokens_per_s']['update']:8.1f}"
              f"  | peak {r['peak_memory_mb']:.0f} MB, params MB {r['params_mb']}  ({time.time() - t0:.0f}s wall, load {load()})", flush=True)
        r["load_average"] = load()
    info = {
        "benchmark": "one PPO iteration (RLTrainer.run_unit): generation, scoring, update",
        "shape": shape, "device": device, "torch": torch.__version__, "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None, "cpu_count": os.cpu_count(),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip(),
        "dirty": bool(subprocess.run(["git", "status", "--porcelain", "--", "rlhf_fast", "benchmarks/bench_ppo_step.py"], cwd=HERE,
                                     capture_output=True, text=True).stdout.strip()),
        "settings": {k: v for k, v in vars(args).items() if k not in ("variant", "workdir", "out")},
        "results": results,
    }
    out = Path(args.out) if args.out else HERE / "results" / f"ppo_step_{args.preset}_{device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1))
    workdir.cleanup()
    print(out)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

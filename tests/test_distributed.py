"""Data parallelism under FSDP2 (2 processes, gloo, CPU, as torchrun sets them up): a run gives the same losses, metrics
and weights as one process on the same global batch; a sharded checkpoint resumes at the same and another world
size; a rank that fails ends the job with its rank named."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ppo_tiny import make_stage_data, make_tiny_models
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
TIMING = ("time/", "throughput/", "memory/")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny models, the SFT / DPO data files, and the pairs labelled for two reward heads (``rm``), by name."""
    out = make_tiny_models(tmp_path_factory.mktemp("tiny")) | make_stage_data(data := tmp_path_factory.mktemp("data"))
    rows = [json.loads(line) for line in Path(out["pairs"]).read_text().splitlines()]
    (data / "rm.jsonl").write_text("".join(json.dumps(r | {"objective": ("helpful", "harmless")[i % 2]}) + "\n" for i, r in enumerate(rows)))
    return out | {"rm": str(data / "rm.jsonl")}


def _trainer(kind: str, overrides: dict, resume: str | None = None):
    from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
    from rlhf_fast.trainers.rm import RewardModelTrainer, RMConfig
    from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer
    from rlhf_fast.trainers.stage import load_stage_config

    cls, cfg_cls = {"sft": (SFTTrainer, SFTConfig), "dpo": (DPOTrainer, DPOConfig), "rm": (RewardModelTrainer, RMConfig)}[kind]
    return cls(load_stage_config(cfg_cls, None, overrides), resume=resume)


def _worker(rank: int, world: int, port: int, kind: str, runs: list, err_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    try:
        for overrides, resume in runs:
            _trainer(kind, overrides, resume).train()
    except Exception as e:  # the parent reads what each rank raised
        Path(f"{err_file}.{rank}").write_text(f"{type(e).__name__}: {e}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _launch(world: int, kind: str, runs: list, tmp_path: Path) -> None:
    """``runs`` (overrides, resume) one after another in ``world`` processes, as torchrun would start them."""
    mp.spawn(_worker, args=(world, _free_port(), kind, runs, str(tmp_path / "err")), nprocs=world, join=True)


def _run(world: int, kind: str, runs: list, tmp_path: Path) -> None:
    if world == 1:
        for overrides, resume in runs:
            _trainer(kind, overrides, resume).train()
    else:
        _launch(world, kind, runs, tmp_path)


def _rows(run_dir: Path) -> list[dict]:
    from rlhf_fast.tracking import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_metrics(run_dir)]


def _final_weights(run_dir: Path) -> dict:
    """The final folder's weights: the model's, or a LoRA run's adapter."""
    final = run_dir / "final" / "model.safetensors"
    return load_file(final if final.is_file() else final.with_name("adapter_model.safetensors"))


def _close(a: list[dict], b: list[dict], tol: float) -> None:
    assert len(a) == len(b) and [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            if isinstance(rb[k], str):  # a non-finite value, as metrics.jsonl writes it
                assert ra[k] == rb[k], (ra["iteration"], k, ra[k], rb[k])
            else:
                assert ra[k] == pytest.approx(rb[k], rel=tol, abs=tol), (ra["iteration"], k, ra[k], rb[k])


def _base(files, kind: str, out: Path, **over) -> dict:
    model = ({"model.backbone": files["policy"], "model.heads": [{"name": "helpful", "weight": 1.0}, {"name": "harmless", "weight": 0.5}]}
             if kind == "rm" else {"model.policy": files["policy"]})
    return model | {"output_dir": str(out), "threads": 1, "progress_bar": False, "train.batch_size": 8, "train.micro_batch_size": 2,
                    "train.lr": 1e-3, "train.max_steps": 3, "train.eval_every": 2, "save_every": 2,
                    "data.train_file": files[kind if kind != "dpo" else "pairs"]} | over


@pytest.mark.parametrize("kind, over", [("sft", {}), ("dpo", {}), ("dpo", {"model.lora.enabled": True}), ("rm", {}),
                                        ("rm", {"model.train_layers": 0})], ids=["sft", "dpo", "dpo_lora", "rm", "rm_probe"])
def test_two_ranks_equal_one_process(files, tmp_path, kind, over):
    """Each rank takes half of every global batch; token-mean normalisation and metrics are global, FSDP2 averages the
    reduce-scattered gradients: losses, grad norms, eval metrics and the final weights match one process's run (the
    reward model's: its combined head and each head, gathered and written by rank 0; ``rm_probe``: heads only, on
    features computed once)."""
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        _run(world, kind, [(_base(files, kind, out, **over), None)], tmp_path)
        runs[world] = (_rows(out), _final_weights(out))
        if kind == "rm":
            runs[world][1].update({f"heads.{k}": v for k, v in load_file(out / "final" / "heads.safetensors").items()})
    (rows1, w1), (rows2, w2) = runs[1], runs[2]
    assert "grad_norm" in rows2[1] and ("eval/loss" in rows2[-1] or "eval/accuracy" in rows2[-1])
    if kind == "rm":
        assert w2["score.weight"].shape[0] == 1 and w2["heads.weight"].shape[0] == 2
    # measured: metrics agree to 1.5e-7 relative, weights to 1.0e-7 absolute (fp32: the ranks' partial sums round in
    # another order than one process's); the reward model's to 8.9e-7 at one embedding entry of 12288, whose tiny
    # gradient Adam's normalisation turns into an lr-sized step
    _close(rows2, rows1, 1e-6)
    _close_weights(w2, w1, 2e-6 if kind == "rm" else 5e-7)


@pytest.mark.parametrize("worlds", [(2, 1), (1, 2), (2, 2)])
def test_sharded_checkpoints_resume_at_any_world_size(files, tmp_path, worlds):
    """Stop after step 2 (checkpoint), resume at another world size: the continued run equals an uninterrupted one."""
    first, second = worlds
    full, cut = tmp_path / "full", tmp_path / "cut"
    over = {"train.max_steps": 4, "train.lr_schedule": "constant"}  # the cut run's schedule must not depend on where it stops
    _run(1, "sft", [(_base(files, "sft", full, **over), None)], tmp_path)
    _run(first, "sft", [(_base(files, "sft", cut, **over | {"train.max_steps": 2, "save_final_model": False}), None)], tmp_path)
    assert (cut / "checkpoints" / "iter-000002" / "sharded").is_dir()
    _run(second, "sft", [(_base(files, "sft", cut, **over), str(cut))], tmp_path)
    full_rows, cut_rows = _rows(full), _rows(cut)
    _close(cut_rows[-2:], full_rows[-2:], 1e-6)
    _close_weights(load_file(cut / "final" / "model.safetensors"), load_file(full / "final" / "model.safetensors"), 5e-7)


def _two_ranks(args: list[str], rank_one_extra: list[str] = ()) -> list[tuple[int, str]]:
    """``rlhf-fast <args>`` in 2 processes as torchrun starts them; (exit code, stderr) per rank."""
    import subprocess
    import sys

    script = (f"import os, sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from rlhf_fast.cli import main\n"
              f"args = {args!r}\n"
              f"if os.environ['RANK'] == '1': args += {list(rank_one_extra)!r}\n"
              "sys.exit(main(args))\n")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                                                         RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=150) for p in procs]  # a hang fails the test here
    return [(p.returncode, err) for p, (_, err) in zip(procs, outs)]


def test_a_failing_rank_ends_the_job_with_its_rank_named(files, tmp_path):
    """Rank 1 reads a train file that does not exist: it raises a UserError naming its rank and the key; rank 0 does
    not carry on alone (its next collective fails), and neither hangs."""
    bad = _base(files, "sft", tmp_path / "bad", **{"dist_timeout_s": 30})
    (rc0, _), (rc1, err1) = _two_ranks(["sft"] + [f"--{k}={v}" for k, v in bad.items()], ["--data.train_file=/nonexistent.jsonl"])
    assert rc1 == 2 and "error: rank 1 of 2: data.train_file" in err1, err1[-2000:]
    assert rc0 != 0


def test_cpu_offload_needs_a_gpu():
    from rlhf_fast import distributed
    from rlhf_fast.errors import UserError

    with pytest.raises(UserError, match="fsdp_cpu_offload: offloads a GPU run's parameters to the CPU; this run's model is on cpu"):
        distributed.shard(torch.nn.Linear(2, 2), torch.nn.ModuleList(), cpu_offload=True)


def test_a_reward_that_fails_on_one_rank_ends_the_job(files, tmp_path):
    """Mid-run: the reward function raises on rank 1 during the first iteration; both ranks exit non-zero."""
    args = ["ppo", f"--model.policy={files['policy']}", f"--output_dir={tmp_path / 'run'}", "--threads=1", "--progress_bar=false",
            "--ppo.iterations=2", "--ppo.batch_size=4", "--ppo.minibatch_size=4", "--ppo.micro_batch_size=2",
            "--generation.max_new_tokens=6", "--eval.num_prompts=2", "--eval.batch_size=2", "--critic.share_backbone=true",
            "--dist_timeout_s=30", "--reward.sources=[{spec: 'ppo_tiny:rank_one_fails_reward'}]"]
    (rc0, _), (rc1, err1) = _two_ranks(args)
    assert rc1 != 0 and "error: rank 1 of 2: RuntimeError: reward service unreachable" in err1, err1[-2000:]
    assert rc0 != 0


def _ops_worker(rank: int, world: int, port: int, parts: list, out: str) -> None:
    """This rank's share of each batch through the ops with ``process_group``; writes what they return."""
    from rlhf_fast import ops

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, mask, rewards, scores = parts[rank]
        g = dist.group.WORLD
        torch.save({"whiten": ops.masked_whiten(x, mask, process_group=g),
                    "whiten_scale": ops.masked_whiten(x, mask, shift_mean=False, process_group=g),
                    "rpp": ops.reinforce_pp_advantages(rewards, mask, gamma=0.9, process_group=g),
                    "rpp1": ops.reinforce_pp_advantages(rewards, mask, gamma=1.0, process_group=g),
                    "reinforce": ops.outcome_advantages(scores, None, estimator="reinforce", baseline="batch_mean",
                                                        process_group=g)}, f"{out}.{rank}")
        with pytest.raises(ValueError, match="process_group: 'grpo' has no batch statistic"):
            ops.outcome_advantages(scores, torch.zeros(len(scores), dtype=torch.long), estimator="grpo", process_group=g)
        with pytest.raises(TypeError, match="process_group: expected a torch.distributed.ProcessGroup or None, got str"):
            ops.masked_whiten(x, mask, process_group="world")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["random", "empty_rank", "constant_per_rank"])
def test_ops_batch_statistics_over_ranks(tmp_path, case):
    """Whitening, REINFORCE++'s returns and the batch-mean baseline with ``process_group``: each of 2 ranks holds a
    share of the batch (unequal, one possibly without a valid token) and gets its rows of what the float64 references
    give on the whole batch. ``constant_per_rank``: each rank's returns are constant but differ between ranks, so only
    a global check leaves them non-zero."""
    from test_advantages import ref_outcome, ref_reinforce_pp

    gen, t = torch.Generator().manual_seed(7), 6
    parts = []
    for rank, rows in enumerate((3, 2)):
        mask = torch.rand(rows, t, generator=gen) < 0.7
        mask[:, 0] = True
        if case == "empty_rank" and rank == 1:
            mask[:] = False
        rewards = torch.randn(rows, t, generator=gen)
        if case == "constant_per_rank":  # one reward at the first token: every return of the rank is the same
            mask = torch.zeros(rows, t, dtype=torch.bool)
            mask[:, 0] = True
            rewards = torch.full((rows, t), float(rank + 1))
        parts.append((torch.randn(rows, t, generator=gen), mask, rewards, torch.randn(rows, generator=gen)))
    mp.spawn(_ops_worker, args=(2, _free_port(), parts, str(tmp_path / "out")), nprocs=2, join=True)
    got = {k: torch.cat([torch.load(tmp_path / f"out.{r}")[k] for r in range(2)]) for k in ("whiten", "whiten_scale", "rpp", "rpp1",
                                                                                             "reinforce")}
    x, mask, rewards, scores = (torch.cat(z) for z in zip(*parts))
    v = x[mask].double()
    mean, std = v.mean(), ((v - v.mean()).square().sum() / (len(v) - 1) + 1e-8).sqrt()
    want = {"whiten": torch.where(mask, (x.double() - mean) / std, 0.0),
            "whiten_scale": torch.where(mask, (x.double() - mean) / std + mean, 0.0),
            "rpp": torch.tensor(ref_reinforce_pp(rewards, mask, 0.9), dtype=torch.float64),
            "rpp1": torch.tensor(ref_reinforce_pp(rewards, mask, 1.0), dtype=torch.float64),
            "reinforce": torch.tensor(ref_outcome(scores, None, [True] * len(scores), "reinforce", baseline="batch_mean"),
                                      dtype=torch.float64)}
    if case == "constant_per_rank":
        assert got["rpp"].abs().max() > 0.5  # global returns vary: not zeroed
    for k in want:  # fp32 in, statistics in float64 (x's dtype for whitening): measured max error ~2e-7
        torch.testing.assert_close(got[k].double(), want[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_ops_process_group_errors():
    from rlhf_fast import ops

    x, m = torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
        ops.masked_whiten(x, m, process_group=object())
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
        ops.reinforce_pp_advantages(x, m, process_group=object())


def _rl_worker(rank: int, world: int, port: int, runs: list, err_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    try:
        _rl_runs(runs)
    except Exception as e:
        Path(f"{err_file}.{rank}").write_text(f"{type(e).__name__}: {e}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _rl_runs(runs: list) -> None:
    """Greedy responses: the rollout of a prompt is then the same whichever rank samples it, so one process and two
    ranks train on the same global batch (sampled responses would differ with each rank's random stream). What only
    one process does (the policy's last hidden states kept from sampling, packed decode weights) is off in every run:
    its rounding is tested apart (test_ppo.py), and Adam's first steps would amplify it past these tolerances."""
    import functools

    from ppo_tiny import tiny_config

    import rlhf_fast.trainers.ppo as ppo
    from rlhf_fast.rollout import generate

    ppo.generate = functools.partial(generate, greedy=True)
    try:
        for (policy, out, over), resume in runs:
            one_process_only = {"generation.keep_last_hidden": False, "generation.packed_weights": False}
            trainer = ppo.RLTrainer(tiny_config(policy, Path(out), **over, **one_process_only), resume=resume)
            trainer.train()
            if dist.is_initialized():  # which models hold only shards of their weights now, after the run
                models = {k: getattr(trainer, k) for k in ("policy", "ref", "ref_top", "critic") if getattr(trainer, k) is not None}
                sharded = {k: all(type(p).__name__ == "DTensor" for p in m.parameters()) for k, m in models.items()}
                (Path(out) / f"sharded.{dist.get_rank()}.json").write_text(json.dumps(sharded))
    finally:  # the one-process run shares the test process with every other test
        ppo.generate = generate


def _rl(world: int, runs: list, tmp_path: Path) -> None:
    if world == 1:
        _rl_runs(runs)
    else:
        mp.spawn(_rl_worker, args=(world, _free_port(), runs, str(tmp_path / "err")), nprocs=world, join=True)


@pytest.mark.parametrize("over", [
    {"critic.share_backbone": True, "reward.normalize": True, "model.trainable_layers": 1, "ppo.kl_target": 0.01},  # PPO
    {"ppo.kl_estimator": "full"},  # full copies: the reference, and a critic with its own backbone
    {"model.trainable_layers": 1, "critic.trainable_layers": 1},  # reference and critic: their own top layers on the shared trunk
    {"algorithm.adv_estimator": "grpo", "generation.n": 2, "ppo.batch_size": 4, "algorithm.kl_in": "loss", "ppo.kl_estimator": "k3"},
    {"algorithm.adv_estimator": "reinforce_pp", "model.trainable_layers": 1},
    {"algorithm.adv_estimator": "reinforce", "algorithm.reinforce_baseline": "batch_mean", "eval.num_prompts": 3},  # 2 + 1 (+ 1 pad)
    {"algorithm.adv_estimator": "remax", "model.trainable_layers": 1},
    # the reference is the policy with adapters off. The tiny model's rewards are all 0: the entropy bonus and the KL in
    # the loss give the adapters a gradient (a KL in the rewards would be all the advantages hold, and whitening them
    # would scale its rounding up), and a large Adam eps keeps rounding-level gradient entries from lr-sized steps
    {"model.lora.enabled": True, "critic.share_backbone": True, "ppo.entropy_coef": 0.1, "algorithm.kl_in": "loss",
     "ppo.adam_eps": 1e-4},
], ids=["ppo", "ppo_full_copies", "ppo_top_copies", "grpo", "reinforce_pp", "reinforce", "remax", "lora"])
def test_rl_two_ranks_equal_one_process(files, tmp_path, over):
    """Each rank samples half of the prompts (GRPO's groups stay on one rank); advantage whitening (GAE's, REINFORCE++'s),
    the batch-mean baseline, reward moments, the KL controller, token-mean weights and metrics are global; the
    reference and a separate critic are sharded like the policy: the run matches one process's on the same batch."""
    over = dict(over, **{"ppo.iterations": 2, "eval.every": 1, "ppo.ppo_epochs": 2, "save_final_model": True})
    over.setdefault("ppo.minibatch_size", over.get("ppo.batch_size", 8) * over.get("generation.n", 1))  # one minibatch: no shuffle
    (rows1, w1), (rows2, w2) = _rl_one_and_two(files, tmp_path, over)
    assert (tmp_path / "w2" / "config.yaml").read_text().startswith("# world_size: 2")
    for rank in range(2):  # every model is sharded, and the reference's gathered weights were freed after its forwards
        sharded = json.loads((tmp_path / "w2" / f"sharded.{rank}.json").read_text())
        assert all(sharded.values()) and ("ref" in sharded or "ref_top" in sharded or over.get("model.lora.enabled")), sharded
    assert len(rows1) == 3 and "grad_norm" in rows2[1] and "eval/reward" in rows2[-1]
    _close(rows2, rows1, 1e-5)
    _close_weights(w2, w1, 1e-6)


def _rl_one_and_two(files, tmp_path: Path, over: dict) -> list[tuple[list[dict], dict]]:
    """(metrics rows, final weights) of the run in one process, then on 2 ranks."""
    runs = []
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        _rl(world, [((files["policy"], str(out), over), None)], tmp_path)
        runs.append((_rows(out), _final_weights(out)))
    return runs


def _close_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def test_rl_bf16_two_ranks_track_one_process(files, tmp_path):
    """bf16 under FSDP2 (``MixedPrecisionPolicy``: bf16 weights in the forwards, fp32 gradient reduction; the roots leave
    their inputs alone, so a rollout's fp32 log-probs and advantages are not cast) against bf16 autocast in one process:
    one iteration agrees to bf16 rounding. Measured: grad norm 2.6e-3 relative, per-token KL terms ~1e-5 absolute,
    weights 2.1e-3 (about two Adam steps of lr 1e-3 on entries whose tiny gradients change sign under rounding)."""
    over = {"model.bf16": "true", "model.trainable_layers": 1, "critic.share_backbone": True, "ppo.entropy_coef": 0.1,
            "algorithm.kl_in": "loss", "ppo.iterations": 1, "eval.every": 1, "ppo.ppo_epochs": 2, "save_final_model": True,
            "ppo.minibatch_size": 8}
    (rows1, w1), (rows2, w2) = _rl_one_and_two(files, tmp_path, over)
    assert rows2[1]["grad_norm"] == pytest.approx(rows1[1]["grad_norm"], rel=1e-2)
    _close(rows2, rows1, 3e-2)
    _close_weights(w2, w1, 5e-3)


def test_rl_dynamic_sampling_two_ranks_equal_one_process(files, tmp_path):
    """DAPO's dynamic sampling keeps a different number of rows on each rank (none, on one rank, in some iteration):
    ranks with fewer micro-batches run weight-0 stand-ins so that every rank joins each FSDP collective, and the
    update is the token mean over every rank's kept rows, as in one process."""
    over = {"algorithm.adv_estimator": "grpo", "algorithm.dynamic_sampling": True, "generation.n": 2, "ppo.batch_size": 2,
            "ppo.minibatch_size": 4, "ppo.micro_batch_size": 1, "ppo.iterations": 3, "ppo.ppo_epochs": 2, "eval.every": 3,
            "save_final_model": True, "reward.sources": [{"spec": "ppo_tiny:group_varying_reward"}],
            # greedy copies of a response are equal: their advantages cancel, the entropy bonus does not; what is left of the
            # cancelled terms is rounding noise, which Adam's normalisation would turn into lr-sized steps without a large eps
            "ppo.entropy_coef": 0.1, "ppo.adam_eps": 1e-3}
    (rows1, w1), (rows2, w2) = _rl_one_and_two(files, tmp_path, over)
    kept = [r["groups/kept_frac"] for r in rows2[1:]]
    assert 0.5 in kept and 1.0 in kept, kept  # one rank kept its group, the other none; and both kept theirs
    _close(rows2, rows1, 1e-5)
    _close_weights(w2, w1, 1e-6)


@pytest.mark.parametrize("worlds", [(2, 1), (1, 2)])
def test_rl_checkpoint_resumes_at_another_world_size(files, tmp_path, worlds):
    """PPO with a separate critic: one iteration at one world size (checkpoint), the second at the other, equals two
    iterations in one process (greedy responses, one minibatch: the same batches whatever the world size)."""
    first, second = worlds
    over = {"model.trainable_layers": 1, "critic.trainable_layers": 1, "ppo.minibatch_size": 8, "eval.every": 1,
            "save_every": 1, "ppo.iterations": 2}
    full, cut = tmp_path / "full", tmp_path / "cut"
    _rl(1, [((files["policy"], str(full), over), None)], tmp_path)
    _rl(first, [((files["policy"], str(cut), dict(over, **{"ppo.iterations": 1})), None)], tmp_path)
    assert (cut / "checkpoints" / "iter-000001" / f"rng-{first - 1}.pt").is_file()  # one file per rank
    _rl(second, [((files["policy"], str(cut), over), str(cut))], tmp_path)
    _close(_rows(cut)[-1:], _rows(full)[-1:], 1e-5)

"""PPO trainer end to end on a tiny random-weight Llama (CPU, seconds): an iteration, exact resume after an
interruption, fused == eager losses and gradients, NaN handling, and the option paths."""
import math
import os
import signal

import pytest
import torch
from ppo_tiny import make_tiny_models, tiny_config

from rlhf_fast.cli import main
from rlhf_fast.rollout import token_rewards
from rlhf_fast.tracking import read_metrics
from rlhf_fast.trainers.backend import get_backend
from rlhf_fast.trainers.ppo import RLTrainer

TIMING = ("time/", "throughput/", "memory/")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny"))


def _weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}


def test_one_iteration_end_to_end(tiny, tmp_path):
    cfg = tiny_config(tiny["policy"], tmp_path / "run", **{"ppo.iterations": 1})
    trainer = RLTrainer(cfg)
    before = _weights(trainer)
    result = trainer.train()
    assert result["status"] == "completed" and result["iteration"] == 1
    rows = read_metrics(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [0, 1]
    assert "eval/reward" in rows[0] and "eval/reward" in rows[1]
    for key in ("reward/mean", "kl", "policy/entropy", "policy/clipfrac", "policy/approx_kl", "loss/value",
                "value/explained_variance", "response/length", "throughput/tokens_per_s", "memory/peak_mb",
                "time/generate", "time/score", "time/update", "eval/kl"):
        assert math.isfinite(rows[1][key]), key
    assert rows[1]["global_step"] == cfg.ppo.ppo_epochs * cfg.ppo.batch_size // cfg.ppo.minibatch_size
    after = _weights(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before), "no weight changed"
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "samples.jsonl").is_file()
    assert list((run / "tensorboard").iterdir()), "no TensorBoard events"
    ckpt = run / "checkpoints" / "iter-000001"
    assert {p.name for p in ckpt.iterdir()} == {"sharded", "scheduler.pt", "rng-0.pt", "rng-0.json", "state.json"}
    assert not list((run / "checkpoints").glob(".tmp*")), "temporary checkpoint left behind"


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_resume_after_interruption_reproduces_uninterrupted_run(tiny, tmp_path, sig):
    over = {"ppo.iterations": 3, "ppo.ppo_epochs": 2, "eval.every": 1, "reward.normalize": True, "ppo.kl_target": 0.01,
            "ppo.kl_horizon": 100}
    full = RLTrainer(tiny_config(tiny["policy"], tmp_path / "full", **over))
    assert full.train()["status"] == "completed"

    def interrupt(trainer, iteration, metrics):
        if iteration == 1:
            os.kill(os.getpid(), sig)  # as Ctrl-C / kill would: the handler defers it to a safe point

    cut = RLTrainer(tiny_config(tiny["policy"], tmp_path / "cut", **over), callbacks=[interrupt])
    result = cut.train()
    assert result["status"] == "interrupted" and result["iteration"] == 1
    assert (tmp_path / "cut" / "checkpoints" / "iter-000001" / "state.json").is_file()
    resumed = RLTrainer(tiny_config(tiny["policy"], tmp_path / "cut", **over), resume=tmp_path / "cut")
    assert resumed.iteration == 1
    assert resumed.train()["status"] == "completed"

    a, b = _comparable(read_metrics(tmp_path / "full")), _comparable(read_metrics(tmp_path / "cut"))
    assert [r["iteration"] for r in b] == [0, 1, 2, 3]
    assert a == b
    for (n, p), (_, q) in zip(full.policy.named_parameters(), resumed.policy.named_parameters()):
        assert torch.equal(p, q), n


def test_interrupt_during_rollout_rolls_back_the_iteration(tiny, tmp_path):
    """A signal that lands before the update: no half iteration is recorded, and resuming redoes it exactly."""
    over = {"ppo.iterations": 2}
    full = RLTrainer(tiny_config(tiny["policy"], tmp_path / "full", **over))
    full.train()
    cut = RLTrainer(tiny_config(tiny["policy"], tmp_path / "cut", **over))
    real_score = cut.score

    def score_then_signal(ro):
        real_score(ro)
        if cut.iteration == 1:
            os.kill(os.getpid(), signal.SIGINT)

    cut.score = score_then_signal
    assert cut.train()["status"] == "interrupted"
    assert [r["iteration"] for r in read_metrics(tmp_path / "cut")] == [0, 1]
    resumed = RLTrainer(tiny_config(tiny["policy"], tmp_path / "cut", **over), resume=tmp_path / "cut")
    resumed.train()
    assert _comparable(read_metrics(tmp_path / "full")) == _comparable(read_metrics(tmp_path / "cut"))


def _scored_batch(trainer, n=4):
    """A rollout with old log-probs, values, rewards and advantages, as the update receives it."""
    torch.manual_seed(1)
    from rlhf_fast.rollout import generate

    prompts = trainer.data.train[:n]
    ro = generate(trainer.policy, trainer.tokenizer, prompts, trainer.cfg.generation, trainer.eos_ids, trainer.device, trainer.autocast)
    trainer.score(ro)
    scores = torch.linspace(-1, 1, len(ro))
    ro.rewards = token_rewards(scores, ro.kl, ro.response_mask, 0.1)
    ro.advantages, ro.returns = trainer.backend.gae(ro.rewards, ro.values, ro.response_mask, 1.0, 0.95)
    ro.logprobs = ro.logprobs + 0.05 * torch.randn_like(ro.logprobs)  # ratios away from 1: clipping engages
    return ro


@pytest.mark.parametrize("kl_estimator", ["k1", "full"])
def test_fused_and_eager_give_same_losses_and_gradients(tiny, tmp_path, kl_estimator):
    over = {"ppo.entropy_coef": 0.01, "ppo.kl_estimator": kl_estimator, "ppo.clip_eps": 0.02, "ppo.dual_clip": 3.0}
    trainer = RLTrainer(tiny_config(tiny["policy"], tmp_path / "run", **over))
    trainer.critic.head.weight.data.normal_(0, 0.1)  # a critic that is not identically zero
    ro = _scored_batch(trainer)
    results = {}
    for name in ("fused", "eager"):
        trainer.backend = get_backend(name)
        scored = ro.select(torch.arange(len(ro)))
        trainer.score(scored)
        adv, ret = trainer.backend.gae(ro.rewards, ro.values, ro.response_mask, 1.0, 0.95)
        trainer.optimizer.zero_grad()
        loss, stats = trainer.compute_loss(ro)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None}
        grads |= {f"critic.{n}": p.grad.clone() for n, p in trainer.critic.named_parameters() if p.grad is not None}
        results[name] = (loss.detach(), stats, grads, scored, adv, ret)
    (lf, sf, gf, rf, af, tf), (le, se, ge, re_, ae, te) = results["fused"], results["eager"]
    assert float(sf["clipfrac"]) > 0, "the batch should exercise clipping"
    torch.testing.assert_close(lf, le, rtol=1e-5, atol=1e-6)
    for k in ("clipfrac", "approx_kl", "entropy", "loss/value"):
        torch.testing.assert_close(sf[k], se[k], rtol=1e-5, atol=1e-6)
    assert gf.keys() == ge.keys() and len(gf) > 0
    for n in gf:
        torch.testing.assert_close(gf[n], ge[n], rtol=1e-4, atol=1e-6, msg=n)
    for k in ("logprobs", "ref_logprobs", "values", "kl"):
        torch.testing.assert_close(getattr(rf, k), getattr(re_, k), rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(af, ae, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tf, te, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_matches_one_big_minibatch(tiny, tmp_path):
    trainer = RLTrainer(tiny_config(tiny["policy"], tmp_path / "run"))
    ro = _scored_batch(trainer)
    idx = torch.arange(len(ro))
    trainer.optimizer.zero_grad()
    loss, _ = trainer.compute_loss(ro)
    loss.backward()
    whole = {n: p.grad.clone() for n, p in trainer.policy.named_parameters()}
    trainer.optimizer.zero_grad()
    micros = [idx[:1], idx[1:]]
    for micro, w in zip(micros, trainer._micro_weights(micros, ro.response_mask)):
        part, _ = trainer.compute_loss(ro.select(micro))
        (part * w).backward()
    for n, p in trainer.policy.named_parameters():
        torch.testing.assert_close(p.grad, whole[n], rtol=1e-4, atol=1e-7, msg=n)


def test_nan_reward_skips_the_update(tiny, tmp_path):
    cfg = tiny_config(tiny["policy"], tmp_path / "run", **{"ppo.iterations": 1, "reward.sources": [{"spec": "ppo_tiny:nan_reward"}]})
    trainer = RLTrainer(cfg)
    before = _weights(trainer)
    trainer.train()
    row = read_metrics(tmp_path / "run")[-1]
    assert row["skipped_updates"] == 1 and row["global_step"] == 0
    assert row["reward/mean"] == "nan"  # logged, not hidden
    assert all(torch.equal(before[n], p) for n, p in trainer.policy.named_parameters())
    assert not trainer.optimizer.state, "the optimizer must not have stepped"


def test_nan_loss_skips_the_step(tiny, tmp_path):
    trainer = RLTrainer(tiny_config(tiny["policy"], tmp_path / "run", **{"ppo.minibatch_size": 4}))
    ro = _scored_batch(trainer, n=8)
    ro.advantages[0, 0] = float("nan")  # poisons the one minibatch (of two) that holds row 0
    trainer.update(ro)
    assert trainer.skipped_steps == 1 and trainer.global_step == 1
    for n, p in trainer.policy.named_parameters():
        assert torch.isfinite(p).all(), n


@pytest.mark.parametrize("over", [
    {"model.lora.enabled": True, "model.lora.r": 4, "critic.share_backbone": True, "ppo.kl_estimator": "full"},
    {"kernels": "eager", "ppo.kl_estimator": "k3", "ppo.kl_target": 0.1, "reward.missing_eos_penalty": 1.0, "reward.clip": 0.5,
     "model.trainable_layers": 1, "critic.share_backbone": True},
    {"critic.init_from": "reward", "reward.sources": [{"spec": "RM"}], "model.gradient_checkpointing": True},
])
def test_option_paths_run(tiny, tmp_path, over):
    if over.get("reward.sources") == [{"spec": "RM"}]:
        over = dict(over, **{"reward.sources": [{"spec": tiny["rm_same"]}]})
    trainer = RLTrainer(tiny_config(tiny["policy"], tmp_path / "run", **(over | {"ppo.iterations": 1, "save_final_model": True})))
    result = trainer.train()
    assert result["status"] == "completed"
    assert math.isfinite(result["loss/total"]) and math.isfinite(result["eval/kl"])
    assert (tmp_path / "run" / "final").is_dir()
    if over.get("model.trainable_layers"):  # only the top layer, its norm and the value head train
        names = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
        assert names and all(n.startswith(("model.layers.1.", "model.norm.")) for n in names), names
    if over.get("model.lora.enabled"):
        assert trainer.ref is None and trainer.critic.body is None  # no second copy of the model
        assert result["eval/kl"] > 0  # adapters moved the policy away from the base model


def test_cli_runs_and_plots(tiny, tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"model:\n  policy: {tiny['policy']}\nppo:\n  iterations: 1\n  batch_size: 4\n  minibatch_size: 4\n"
                        f"  micro_batch_size: 4\nreward:\n  sources:\n    - spec: ppo_tiny:letter_reward\n")
    run = tmp_path / "run"
    argv = ["ppo", "--config", str(cfg_path), f"--output_dir={run}", "--generation.max_new_tokens", "6",
            "--eval.num_prompts=4", "--progress_bar=false", "--save_final_model=false"]
    assert main(argv) == 0
    assert [r["iteration"] for r in read_metrics(run)] == [0, 1]
    assert main(["ppo", "--resume", str(run), "--ppo.iterations=2"]) == 0  # extend a finished run
    assert [r["iteration"] for r in read_metrics(run)] == [0, 1, 2]
    assert main(["plot", str(run)]) == 0
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_checkpoint_of_the_earlier_layout_is_refused_clearly(tiny, tmp_path):
    """A run dir whose checkpoint predates the sharded layout (weights.safetensors) stops with a message, not a traceback."""
    from rlhf_fast.errors import UserError

    ckpt = tmp_path / "run" / "checkpoints" / "iter-000001"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text('{"iteration": 1}')
    (ckpt / "weights.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="earlier version of rlhf_fast"):
        RLTrainer(tiny_config(tiny["policy"], tmp_path / "run"), resume=tmp_path / "run")


@pytest.mark.parametrize("packed", [True, False])
def test_sampling_draws_from_the_policys_own_next_token_scores(tiny, tmp_path, monkeypatch, packed):
    """The scores the sampler draws from at each decode step are the policy's own logits at that position (a full
    forward over the sampled sequences), up to KV-cache rounding: nothing between the model and the draw alters them,
    with the linear layers' weights packed for the decode (``generation.packed_weights``) or not."""
    import rlhf_fast.rollout as rollout
    from rlhf_fast.models import position_ids

    seen, real = [], rollout.sample_by_inversion
    monkeypatch.setattr(rollout, "sample_by_inversion", lambda scores, temp, **kw: (seen.append(scores / temp), real(scores, temp, **kw))[1])
    trainer = RLTrainer(tiny_config(tiny["policy"], tmp_path, **{"generation.max_new_tokens": 6, "generation.temperature": 0.7}))
    torch.manual_seed(0)
    ro = rollout.generate(trainer.policy, trainer.tokenizer, trainer.data.train[:5], trainer.cfg.generation, trainer.eos_ids,
                          trainer.device, trainer.autocast, packed=packed)
    with torch.no_grad():
        logits = trainer.policy(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                                position_ids=position_ids(ro.attention_mask)).logits / 0.7
    assert len(seen) >= ro.response_mask.shape[1] > 0
    for t in range(ro.response_mask.shape[1]):
        m = ro.response_mask[:, t]
        torch.testing.assert_close(seen[t][m], logits[m, ro.prompt_len - 1 + t], rtol=0, atol=1e-6)  # measured 9e-8


def test_scoring_reads_the_policys_hidden_states_kept_from_sampling(tiny, tmp_path):
    """With generation.keep_last_hidden the final norm's outputs recorded while sampling are the policy's hidden states
    of a fresh forward and the sampler's log-probs its logits' (to fp32 rounding), scoring and the evaluation's KL
    run no policy forward and scoring no policy head, and a run equals one that recomputes them to rounding."""
    from rlhf_fast.models import backbone, hidden_states
    from rlhf_fast.rollout import generate

    trainer = RLTrainer(tiny_config(tiny["policy"], tmp_path / "probe", **{"generation.max_new_tokens": 6}))
    prompts = trainer.data.train[:5]
    norm = trainer.kept_last(prompts)
    assert norm is backbone(trainer.policy).norm
    ro = generate(trainer.policy, trainer.tokenizer, prompts, trainer.cfg.generation, trainer.eos_ids, trainer.device,
                  trainer.autocast, keep_last=norm)
    assert not norm._forward_hooks and ro.last_hidden.shape == (*ro.input_ids.shape, 32) and not ro.last_hidden[:, -1].any()
    with torch.no_grad():
        fresh = hidden_states(backbone(trainer.policy), ro.input_ids, ro.attention_mask)
    valid = ro.attention_mask.bool().clone()
    valid[:, -1] = False
    torch.testing.assert_close(ro.last_hidden[valid], fresh[valid], rtol=0, atol=2e-6)  # measured: 4.8e-7 (values up to 3.6)
    # the sampler's log-probs of the drawn tokens: the model's own logits' log_softmax at the sampling temperature
    from rlhf_fast.models import position_ids

    with torch.no_grad():
        logits = trainer.policy(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                                position_ids=position_ids(ro.attention_mask)).logits.double()
    temp = trainer.cfg.generation.temperature
    ref = (logits[:, ro.prompt_len - 1:-1] / temp).log_softmax(-1).gather(-1, ro.response_ids.unsqueeze(-1)).squeeze(-1)
    m = ro.response_mask
    assert ro.sampled_logprobs.dtype == torch.float32 and not ro.sampled_logprobs[~m].any()
    torch.testing.assert_close(ro.sampled_logprobs[m].double(), ref[m], rtol=0, atol=5e-6)  # measured: up to 7e-7 (values ~-6)
    trainer.cfg.model.trunk_cache_mb = 1e-4  # too big for the budget: nothing kept
    assert trainer.kept_last(prompts) is None

    runs, counts = {}, {}
    for keep in (True, False):
        t = RLTrainer(tiny_config(tiny["policy"], tmp_path / str(keep), **{"ppo.iterations": 2, "eval.every": 1,
                                                                           "generation.keep_last_hidden": keep}))
        forwards, run = [], t.policy_hidden
        t.policy_hidden = lambda ro: forwards.append(torch.is_grad_enabled()) or run(ro)
        heads, backend = [], t.backend

        class Counting:  # the backend, counting its log-prob calls (the heads scoring runs)
            def __getattr__(self, name):
                return getattr(backend, name)

            def logprobs(self, h, *a, **k):
                heads.append(h.shape)
                return backend.logprobs(h, *a, **k)

        t.backend = Counting()
        t.train()
        assert all(forwards) == keep and len(forwards) > 0  # kept: only the update's forwards (with grad) remain
        counts[keep] = len(heads)
        runs[keep] = [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/", "memory/"))}
                      for r in read_metrics(tmp_path / str(keep))]
    assert 0 < 2 * counts[True] == counts[False]  # scoring runs the reference's head only: the sampler's log-probs are the policy's
    for a, b in zip(*runs.values()):
        assert a.keys() == b.keys()
        for k in a:  # measured: up to 9e-7 apart (grad_norm ~1.4); losses ~1e-5 differ by ~2e-8
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k

"""The one RL loop beyond PPO: every advantage estimator end to end on the tiny Llama (CPU, seconds), exact resume,
no critic where none is needed, DAPO's group filter, in-loss KL and the loss variants fused == eager."""
import math
import os
import signal

import pytest
import torch
from ppo_tiny import grouped_rollout, make_tiny_models, tiny_config
from torch.distributed.checkpoint import FileSystemReader

from rlhf_fast.checkpoint import StopRequest
from rlhf_fast.errors import UserError
from rlhf_fast.tracking import read_metrics
from rlhf_fast.trainers.backend import get_backend
from rlhf_fast.trainers.ppo import RLTrainer

TIMING = ("time/", "throughput/", "memory/")
GROUPED = {"generation.n": 2, "ppo.batch_size": 4}  # 4 prompts x 2 responses = 8 rows, as the PPO tests' batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny"))


def _weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}


@pytest.mark.parametrize("over", [
    {"algorithm.adv_estimator": "grpo", "algorithm.kl_in": "loss", "ppo.kl_estimator": "k3", **GROUPED},
    {"algorithm.adv_estimator": "grpo", "algorithm.norm_adv_by_std": False, "ppo.loss_agg": "seq-mean-token-sum-norm",
     "algorithm.importance_ratio": "sequence", **GROUPED},
    {"algorithm.adv_estimator": "rloo", "algorithm.policy_loss": "cispo", "ppo.clip_eps_high": 0.3, **GROUPED},
    {"algorithm.adv_estimator": "reinforce", "algorithm.policy_loss": "sapo"},
    {"algorithm.adv_estimator": "reinforce_pp", "ppo.gamma": 0.99},
    {"algorithm.adv_estimator": "remax", "algorithm.dynamic_sampling": False},
    {"algorithm.adv_estimator": "grpo", "algorithm.dynamic_sampling": True, **GROUPED},
], ids=["grpo-kl-in-loss", "drgrpo-gspo", "rloo-cispo", "reinforce-sapo", "reinforce_pp", "remax", "grpo-dynamic-sampling"])
def test_each_estimator_runs_without_a_critic(tiny, tmp_path, over):
    trainer = RLTrainer(tiny_config(tiny["policy"], tmp_path / "run", **over, **{"ppo.iterations": 1}))
    assert trainer.critic is None and trainer.critic_params == []
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(trainer.policy_params)
    before = _weights(trainer)
    result = trainer.train()
    assert result["status"] == "completed"
    row = read_metrics(tmp_path / "run")[-1]
    for key in ("reward/mean", "kl", "loss/policy", "policy/entropy", "grad_norm", "eval/reward", "groups/kept_frac"):
        assert math.isfinite(row[key]), key
    assert not any(k.startswith(("value/", "loss/value")) for k in row), "value metrics without a critic"
    if over.get("algorithm.kl_in") == "loss":
        assert math.isfinite(row["loss/kl"])
    if row["groups/kept_frac"] > 0:
        assert any(not torch.equal(before[n], p) for n, p in trainer.policy.named_parameters()), "no weight changed"
    saved = FileSystemReader(tmp_path / "run" / "checkpoints" / "iter-000001" / "sharded").read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("model.")]
    assert weights and all(k.startswith("model.policy.") for k in weights), "a critic was checkpointed"


def test_rollout_groups_are_n_responses_per_prompt(tiny, tmp_path):
    trainer = RLTrainer(tiny_config(tiny["policy"], tmp_path / "run", **GROUPED, **{"algorithm.adv_estimator": "grpo"}))
    seen = {}

    def spy(ro):
        seen["ro"] = ro
        real_score(ro)

    real_score, trainer.score = trainer.score, spy
    with StopRequest() as stop:
        trainer.run_unit(stop)
    ro = seen["ro"]
    assert len(ro) == 8 and ro.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    prompt_rows = ro.input_ids[:, :ro.prompt_len]
    assert torch.equal(prompt_rows[0::2], prompt_rows[1::2])  # the two samples of a group answer one prompt


def test_outcome_advantages_price_the_kl_and_fill_the_response(tiny, tmp_path):
    """GRPO with the KL in the reward: A_i = (s_i - beta KL_i - mean_g) / (std_g + eps) on every valid token, 0 elsewhere."""
    trainer = RLTrainer(tiny_config(tiny["policy"], tmp_path / "run", **GROUPED, **{"algorithm.adv_estimator": "grpo",
                                                                                    "ppo.kl_coef": 0.3}))
    ro = grouped_rollout(trainer, 4)
    ro.kl = torch.where(ro.response_mask, torch.rand(ro.kl.shape, generator=torch.Generator().manual_seed(0)), 0.0)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.5, -1.0, 2.0, 0.0, 0.3])
    kept, _ = trainer.filter_groups(ro, scores)
    trainer.advantages(kept, scores)
    seq = (scores.double() - 0.3 * ro.kl.double().sum(-1)).tolist()
    for g in range(4):
        a, b = seq[2 * g], seq[2 * g + 1]
        mean, std = (a + b) / 2, abs(a - b) / math.sqrt(2)  # unbiased std of two numbers
        for i, x in ((2 * g, a), (2 * g + 1, b)):
            want = (x - mean) / (std + 1e-6)
            row = kept.advantages[i]
            assert torch.allclose(row[ro.response_mask[i]].double(), torch.full_like(row[ro.response_mask[i]].double(), want), atol=1e-5)
            assert (row[~ro.response_mask[i]] == 0).all()


def test_dynamic_sampling_drops_groups_with_equal_scores(tiny, tmp_path):
    trainer = RLTrainer(tiny_config(tiny["policy"], tmp_path / "run", **GROUPED,
                                    **{"algorithm.adv_estimator": "grpo", "algorithm.dynamic_sampling": True}))
    ro = grouped_rollout(trainer, 4)
    scores = torch.tensor([1.0, 1.0, 0.2, 0.7, 0.0, 0.0, -1.0, 1.0])  # groups 0 and 2 carry no signal
    kept, frac = trainer.filter_groups(ro, scores)
    assert frac == 0.5 and kept.extras["rows"].tolist() == [2, 3, 6, 7]
    assert torch.equal(kept.input_ids, ro.input_ids[[2, 3, 6, 7]]) and kept.group_ids.tolist() == [1, 1, 3, 3]


@pytest.mark.parametrize("over", [
    {"algorithm.kl_in": "loss", "ppo.kl_estimator": "k3", "ppo.kl_coef": 0.5},
    {"algorithm.policy_loss": "cispo", "ppo.clip_eps_high": 0.05},
    {"algorithm.policy_loss": "sapo"},
    {"algorithm.importance_ratio": "sequence", "ppo.loss_agg": "seq-mean-token-sum-norm", "algorithm.loss_norm_length": 16},
], ids=["kl-in-loss", "cispo", "sapo", "gspo-drgrpo"])
def test_fused_and_eager_agree_on_the_loss_variants(tiny, tmp_path, over):
    trainer = RLTrainer(tiny_config(tiny["policy"], tmp_path / "run", **GROUPED, **{"algorithm.adv_estimator": "grpo",
                                                                                    "ppo.entropy_coef": 0.01}, **over))
    ro = grouped_rollout(trainer, 4)
    trainer.advantages(trainer.filter_groups(ro, torch.linspace(-1, 1, len(ro)))[0], torch.linspace(-1, 1, len(ro)))
    ro.logprobs = ro.logprobs + 0.1 * torch.randn(ro.logprobs.shape, generator=torch.Generator().manual_seed(1))
    ro.ref_logprobs = ro.ref_logprobs - 0.2 * torch.rand(ro.logprobs.shape, generator=torch.Generator().manual_seed(2))
    results = {}
    for name in ("fused", "eager"):
        trainer.backend = get_backend(name)
        trainer.optimizer.zero_grad()
        loss, stats = trainer.compute_loss(ro)
        loss.backward()
        results[name] = (loss.detach(), stats, {n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None})
    (lf, sf, gf), (le, se, ge) = results["fused"], results["eager"]
    assert float(lf) != 0
    torch.testing.assert_close(lf, le, rtol=1e-5, atol=1e-6)
    for k in sf:
        if k in se:
            torch.testing.assert_close(sf[k], se[k], rtol=1e-5, atol=1e-6, msg=k)
    assert gf.keys() == ge.keys() and gf
    for n in gf:
        torch.testing.assert_close(gf[n], ge[n], rtol=1e-4, atol=1e-6, msg=n)


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


TRPO = {"algorithm.policy_update": "trpo", "algorithm.max_kl": 0.02, "algorithm.cg_iters": 5, "algorithm.fisher_every": 2}


@pytest.mark.parametrize("over", [
    {"algorithm.adv_estimator": "grpo", **GROUPED, **TRPO, "algorithm.kl_in": "loss", "ppo.kl_estimator": "k3", "ppo.entropy_coef": 0.01},
    {"algorithm.adv_estimator": "gae", "critic.share_backbone": False, **TRPO, "algorithm.vf_epochs": 2},
], ids=["trpo-grpo", "trpo-gae"])
def test_trpo_step_stays_in_the_trust_region(tiny, tmp_path, over):
    trainer = RLTrainer(tiny_config(tiny["policy"], tmp_path / "run", **over, **{"ppo.iterations": 1, "model.trainable_layers": 1}))
    before = _weights(trainer)
    critic_before = {n: p.detach().clone() for n, p in trainer.critic.named_parameters()} if trainer.critic is not None else {}
    assert trainer.train()["status"] == "completed"
    row = read_metrics(tmp_path / "run")[-1]
    assert row["trpo/accepted"] == 1.0 and 0 < row["trpo/kl"] <= 0.02 and row["trpo/improvement"] > 0, row
    assert any(not torch.equal(before[n], p) for n, p in trainer.policy.named_parameters())
    if trainer.critic is not None:
        assert math.isfinite(row["loss/value"])
        assert any(not torch.equal(critic_before[n], p) for n, p in trainer.critic.named_parameters()), "critic did not train"
        assert not trainer.optimizer.state.get(trainer.policy_params[0]), "AdamW stepped the TRPO policy"
    else:
        assert trainer.critic_params == []


def test_trpo_rejects_a_shared_critic(tiny, tmp_path):
    with pytest.raises(UserError, match="share_backbone=false"):
        RLTrainer(tiny_config(tiny["policy"], tmp_path / "run", **TRPO, **{"critic.share_backbone": True}))


@pytest.mark.parametrize("over", [
    {"algorithm.adv_estimator": "grpo", "algorithm.kl_in": "loss", "ppo.kl_estimator": "k3", **GROUPED},
    {"algorithm.adv_estimator": "reinforce_pp", "reward.normalize": True},
    {"algorithm.adv_estimator": "rloo", **GROUPED, **TRPO},
], ids=["grpo", "reinforce_pp", "trpo-rloo"])
def test_resume_after_sigterm_reproduces_uninterrupted_run(tiny, tmp_path, over):
    over = dict(over, **{"ppo.iterations": 3, "eval.every": 1})
    full = RLTrainer(tiny_config(tiny["policy"], tmp_path / "full", **over))
    assert full.train()["status"] == "completed"

    def interrupt(trainer, iteration, metrics):
        if iteration == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    cut = RLTrainer(tiny_config(tiny["policy"], tmp_path / "cut", **over), callbacks=[interrupt])
    assert cut.train()["status"] == "interrupted"
    resumed = RLTrainer(tiny_config(tiny["policy"], tmp_path / "cut", **over), resume=tmp_path / "cut")
    assert resumed.iteration == 1 and resumed.train()["status"] == "completed"
    assert _comparable(read_metrics(tmp_path / "full")) == _comparable(read_metrics(tmp_path / "cut"))
    for (n, p), (_, q) in zip(full.policy.named_parameters(), resumed.policy.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("over, match", [
    ({"algorithm.adv_estimator": "grpo"}, "generation.n >= 2"),
    ({"algorithm.adv_estimator": "rloo", "generation.n": 1}, "generation.n >= 2"),
    ({"algorithm.dynamic_sampling": True}, "dynamic_sampling"),
    ({"algorithm.adv_estimator": "ppo"}, "algorithm.adv_estimator"),
    ({"algorithm.kl_in": "loss", "ppo.kl_estimator": "full"}, "kl_estimator"),
    ({"algorithm.kl_in": "loss", "ppo.kl_target": 1.0}, "kl_target"),
    ({"algorithm.policy_update": "trpo", "algorithm.policy_loss": "cispo"}, "policy_loss"),
    ({"algorithm.max_kl": 0.0}, "max_kl"),
    ({"generation.n": 3, "ppo.batch_size": 3}, "multiple of ppo.minibatch_size"),
])
def test_algorithm_config_errors(tiny, tmp_path, over, match):
    with pytest.raises(UserError, match=match):
        tiny_config(tiny["policy"], tmp_path / "run", **over)


def test_cli_rl_command_runs_grpo_and_plots_without_a_critic(tiny, tmp_path):
    from rlhf_fast.cli import main

    run = tmp_path / "run"
    argv = ["rl", f"--model.policy={tiny['policy']}", f"--output_dir={run}", "--reward.sources=[{spec: 'ppo_tiny:letter_reward'}]",
            "--algorithm.adv_estimator=grpo", "--generation.n=2", "--ppo.batch_size=2", "--ppo.minibatch_size=4",
            "--ppo.micro_batch_size=4", "--ppo.iterations=1", "--generation.max_new_tokens=6", "--eval.num_prompts=2",
            "--progress_bar=false", "--save_final_model=false"]
    assert main(argv) == 0
    assert [r["iteration"] for r in read_metrics(run)] == [0, 1]
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

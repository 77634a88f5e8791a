"""Frozen-trunk sharing (models.TrunkSplit): the bottom layers run once for policy and reference and once per rollout,
and the results equal those of the full forwards."""
import pytest
import torch
from ppo_tiny import make_tiny_models, tiny_config

from rlhf_fast.models import TrunkSplit, backbone, hidden_states, load_causal_lm
from rlhf_fast.rollout import common_prefix, generate
from rlhf_fast.tracking import read_metrics
from rlhf_fast.trainers.ppo import RLTrainer

TIMING = ("time/", "throughput/", "memory/")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny"))


def test_top_of_bottom_equals_the_full_forward(tiny):
    model = load_causal_lm(tiny["policy"], "sdpa", torch.device("cpu"))
    body = backbone(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as rollouts have
    mask[1, :1] = 0
    split = TrunkSplit(body, 1)
    full = hidden_states(body, ids, mask)
    bottom = split.bottom(ids, mask)
    assert len(body.layers) == 2 and isinstance(body.norm, torch.nn.Module) and not isinstance(body.norm, torch.nn.Identity)
    torch.testing.assert_close(split.top(bottom, mask), full, rtol=0, atol=1e-6)
    # a different top (the reference's copy, perturbed) runs from the same bottom
    layers, norm = split.frozen_top_copy()
    with torch.no_grad():
        layers[0].mlp.down_proj.weight.mul_(2.0)
    other = split.top(bottom, mask, layers, norm)
    assert not torch.allclose(other[mask.bool()], full[mask.bool()], atol=1e-4)
    torch.testing.assert_close(split.top(bottom, mask), full, rtol=0, atol=1e-6)  # the body's own modules are back


def test_top_with_a_shared_prefix_equals_the_rows_own(tiny):
    """TrunkSplit.top with the first columns run once for all rows: the same hidden states on attended positions and
    the same weight gradients (each row's own prefix copy contributes to them in the plain path) to fp32 rounding."""
    from rlhf_fast.rollout import pad_after_prefix

    model = load_causal_lm(tiny["policy"], "sdpa", torch.device("cpu"))
    split = TrunkSplit(backbone(model), 1)
    g = torch.Generator().manual_seed(1)
    head = torch.randint(3, 300, (5,), generator=g).tolist()
    seqs = [head + torch.randint(3, 300, (k,), generator=g).tolist() for k in (4, 1, 7, 3)]
    ids, mask = pad_after_prefix(seqs, 0, 5)  # padding after the 5 shared columns
    assert not mask.all()
    with torch.no_grad():
        bottom = split.bottom(ids, mask)
    top = split.body.layers[1]
    weight = torch.randn(bottom.shape, generator=g) * mask[..., None]  # a loss over attended positions only
    out, grads = {}, {}
    for prefix in (0, 5):
        out[prefix] = split.top(bottom, mask, prefix=prefix)
        grads[prefix] = torch.autograd.grad((out[prefix] * weight).sum(), list(top.parameters()))
    valid = mask.bool()
    torch.testing.assert_close(out[5][valid], out[0][valid], rtol=0, atol=2e-6)  # measured: up to 7e-7 (values ~1), 5 seeds
    for a, b in zip(grads[5], grads[0]):  # measured: up to 6e-7 of the largest entry, 5 seeds
        assert (a - b).abs().max() <= 2e-6 * b.abs().max()
    # one row, or no shared column: the plain path
    torch.testing.assert_close(split.top(bottom[:1], mask[:1], prefix=5), out[0][:1], rtol=0, atol=0)


@pytest.mark.parametrize("share_prefix,n", [(True, 1), (False, 1), (True, 2)])
def test_sampling_keeps_the_bottom_output(tiny, tmp_path, share_prefix, n):
    """The trunk output recorded while sampling (KV-cached, one column per step; shared prompt tokens encoded once:
    the common prefix, or each prompt of a group of n) equals a fresh bottom forward."""
    trainer = RLTrainer(tiny_config(tiny["policy"], tmp_path, **{"model.trainable_layers": 1, "generation.max_new_tokens": 6}))
    prompts = [trainer.data.train[i] for i in range(4) for _ in range(n)]
    assert len({len(p.ids) for p in prompts}) > 1  # padding in the batch
    boundary = trainer.kept_trunk(prompts)
    assert boundary is trainer.split.body.layers[0]
    ro = generate(trainer.policy, trainer.tokenizer, prompts, trainer.cfg.generation, trainer.eos_ids, trainer.device,
                  trainer.autocast, keep_trunk=boundary, share_prefix=share_prefix)
    assert not boundary._forward_hooks  # the hook is gone after sampling
    prefix = common_prefix([p.ids for p in prompts])
    assert prefix > 0 and bool(ro.attention_mask[:, :prefix].all()) == share_prefix
    assert ro.trunk_hidden.shape == (*ro.input_ids.shape, 32)
    assert not ro.trunk_hidden[:, -1].any()  # the last token is never fed back: a zero column
    with torch.no_grad():
        fresh = trainer.split.bottom(ro.input_ids, ro.attention_mask)
    valid = ro.attention_mask.bool().clone()
    valid[:, -1] = False
    # measured: 7e-9 (values ~0.07); the decode adds keys one at a time, so the sums round differently
    torch.testing.assert_close(ro.trunk_hidden[valid], fresh[valid], rtol=0, atol=1e-7)
    # too big for model.trunk_cache_mb: nothing kept, scoring recomputes
    trainer.cfg.model.trunk_cache_mb = 1e-4
    assert trainer.kept_trunk(prompts) is None


@pytest.mark.parametrize("over", [
    {"ppo.ppo_epochs": 2, "critic.share_backbone": True},
    {"ppo.ppo_epochs": 2, "critic.share_backbone": False, "critic.trainable_layers": 1},  # a separate critic on the shared trunk
    {"algorithm.adv_estimator": "grpo", "generation.n": 2, "ppo.batch_size": 4, "algorithm.kl_in": "loss", "ppo.kl_estimator": "k3"},
    {"algorithm.adv_estimator": "grpo", "generation.n": 2, "ppo.batch_size": 4, "algorithm.policy_update": "trpo",
     "algorithm.max_kl": 0.02, "algorithm.cg_iters": 4},
    {"ppo.kl_estimator": "full", "critic.share_backbone": True, "model.trunk_cache_mb": 0},  # bottom recomputed in the update
], ids=["ppo", "ppo-separate-critic", "grpo", "trpo", "ppo-no-cache"])
def test_sharing_the_frozen_trunk_changes_nothing(tiny, tmp_path, over):
    # the policy's last hidden states kept from sampling change the old log-probs by fp32 rounding in both runs, which
    # Adam's first steps amplify past 1e-6 in the weights: tested apart (test_ppo.py)
    over = dict(over, **{"model.trainable_layers": 1, "ppo.iterations": 2, "eval.every": 1, "generation.keep_last_hidden": False})
    runs = {}
    for share in (True, False):
        trainer = RLTrainer(tiny_config(tiny["policy"], tmp_path / str(share), **over, **{"model.share_frozen_trunk": share}))
        assert (trainer.split is not None) == share and (trainer.ref is None) == share
        bottoms, prefix_runs = [], []
        if share:  # count the bottom's forwards: with the trunk kept from sampling, scoring and updates run none
            run_bottom, run = trainer.split.bottom, trainer.split._run
            trainer.split.bottom = lambda *a, **k: bottoms.append(1) or run_bottom(*a, **k)
            trainer.split._run = lambda *a, **k: prefix_runs.append(k.get("cache") is True) or run(*a, **k)
        trainer.train()
        rows = [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_metrics(tmp_path / str(share))]
        runs[share] = (rows, {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}, trainer)
        if share:
            assert (len(bottoms) > 0) == (over.get("model.trunk_cache_mb") == 0)
            assert any(prefix_runs)  # the tops ran the chat template's prefix once per micro-batch (TrunkSplit.top)
    (rows_s, w_s, shared), (rows_f, w_f, full) = runs[True], runs[False]
    if over.get("critic.trainable_layers"):  # the shared-trunk critic holds its top layer + norm + value head only
        assert shared.critic.body is None and full.critic.body is not None
        critic_s = dict(shared.critic.named_parameters())
        critic_f = {n.replace("body.layers.1.", "top_layers.0.").replace("body.norm.", "top_norm."): p
                    for n, p in full.critic.named_parameters() if p.requires_grad}
        assert critic_s.keys() == critic_f.keys()
        for n in critic_s:
            torch.testing.assert_close(critic_s[n], critic_f[n], rtol=1e-6, atol=1e-6, msg=n)
    assert rows_s[0].keys() == rows_f[0].keys() and len(rows_s) == len(rows_f) == 3
    for a, b in zip(rows_s, rows_f):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6), (k, [(j, a[j], b[j]) for j in a if a[j] != pytest.approx(b[j], rel=1e-6, abs=1e-6)])
    for n in w_s:
        torch.testing.assert_close(w_s[n], w_f[n], rtol=1e-6, atol=1e-6, msg=n)
    # the shared run's reference holds the top layer and the final norm only
    ref_params = sum(p.numel() for p in shared.ref_top.parameters())
    body = backbone(full.ref)
    assert ref_params == sum(p.numel() for p in body.layers[1].parameters()) + sum(p.numel() for p in body.norm.parameters())
    assert ref_params < sum(p.numel() for p in full.ref.parameters()) / 3


@pytest.mark.parametrize("n", [1, 3])
def test_sharing_the_prompt_prefix_samples_the_same_tokens(tiny, tmp_path, n):
    """Greedy responses with the common prefix (n = 1) or each group's prompt (n samples per prompt) encoded once
    equal those of the plain left-padded batch."""
    trainer = RLTrainer(tiny_config(tiny["policy"], tmp_path, **{"generation.max_new_tokens": 8}))
    prompts = [trainer.data.train[i] for i in range(6 // n) for _ in range(n)]
    out = {share: generate(trainer.policy, trainer.tokenizer, prompts, trainer.cfg.generation, trainer.eos_ids, trainer.device,
                           trainer.autocast, greedy=True, share_prefix=share) for share in (True, False)}
    assert torch.equal(out[True].response_ids, out[False].response_ids) and out[True].responses == out[False].responses
    # the same prompt tokens in either layout
    for share, ro in out.items():
        kept = [row[m.bool()].tolist() for row, m in zip(ro.input_ids[:, :ro.prompt_len], ro.attention_mask[:, :ro.prompt_len])]
        assert kept == [p.ids for p in prompts], share

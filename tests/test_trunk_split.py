"""Frozen-trunk sharing (models.TrunkSplit): the bottom layers run once for policy and reference and once per rollout,
and the results equal those of the full forwards."""
import pytest
import torch
from ppo_tiny import make_tiny_models, tiny_config

from rlhf_fast.models import TrunkSplit, backbone, hidden_states, load_causal_lm
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


@pytest.mark.parametrize("over", [
    {"ppo.ppo_epochs": 2, "critic.share_backbone": True},
    {"algorithm.adv_estimator": "grpo", "generation.n": 2, "ppo.batch_size": 4, "algorithm.kl_in": "loss", "ppo.kl_estimator": "k3"},
    {"algorithm.adv_estimator": "grpo", "generation.n": 2, "ppo.batch_size": 4, "algorithm.policy_update": "trpo",
     "algorithm.max_kl": 0.02, "algorithm.cg_iters": 4},
    {"ppo.kl_estimator": "full", "critic.share_backbone": True, "model.trunk_cache_mb": 0},  # bottom recomputed in the update
], ids=["ppo", "grpo", "trpo", "ppo-no-cache"])
def test_sharing_the_frozen_trunk_changes_nothing(tiny, tmp_path, over):
    over = dict(over, **{"model.trainable_layers": 1, "ppo.iterations": 2, "eval.every": 1})
    runs = {}
    for share in (True, False):
        trainer = RLTrainer(tiny_config(tiny["policy"], tmp_path / str(share), **over, **{"model.share_frozen_trunk": share}))
        assert (trainer.split is not None) == share and (trainer.ref is None) == share
        trainer.train()
        rows = [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_metrics(tmp_path / str(share))]
        runs[share] = (rows, {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}, trainer)
    (rows_s, w_s, shared), (rows_f, w_f, full) = runs[True], runs[False]
    assert rows_s[0].keys() == rows_f[0].keys() and len(rows_s) == len(rows_f) == 3
    for a, b in zip(rows_s, rows_f):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6), k
    for n in w_s:
        torch.testing.assert_close(w_s[n], w_f[n], rtol=1e-6, atol=1e-6, msg=n)
    # the shared run's reference holds the top layer and the final norm only
    ref_params = sum(p.numel() for m in shared.ref_top for p in m.parameters())
    body = backbone(full.ref)
    assert ref_params == sum(p.numel() for p in body.layers[1].parameters()) + sum(p.numel() for p in body.norm.parameters())
    assert ref_params < sum(p.numel() for p in full.ref.parameters()) / 3

"""Every documented input error is raised, names the argument, and nothing is silently broadcast or cast."""
import math

import pytest
import torch

from rlhf_fast import ops

N, H, V = 4, 8, 11


def head():
    return torch.randn(N, H), torch.randn(V, H), torch.randint(0, V, (N,))


def tokens(shape=(2, 5)):
    lp = torch.randn(shape)
    return lp, lp + 0.1, torch.randn(shape), torch.ones(shape, dtype=torch.bool)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(hidden=torch.randn(N, H, dtype=torch.float64)), TypeError, "hidden: expected dtype"),
        (dict(hidden=torch.randn(N, H).tolist()), TypeError, "hidden: expected a torch.Tensor"),
        (dict(weight=torch.randn(V, H).double()), TypeError, r"weight: expected dtype in \(float32, bfloat16, float16\), got float64"),
        (dict(weight=torch.randn(V, H + 1)), ValueError, r"weight: expected shape \[V, 8\]"),
        (dict(weight=torch.randn(V * H)), ValueError, "weight: expected 2 dims"),
        (dict(labels=torch.randint(0, V, (N,), dtype=torch.int32)), TypeError, "labels: expected dtype"),
        (dict(labels=torch.randint(0, V, (N + 1,))), ValueError, "labels: expected shape"),
        (dict(labels=torch.randint(0, V, (1,)).expand(N).clone()[None]), ValueError, "labels: expected shape"),
        (dict(labels=torch.tensor([0, 1, V, 2])), ValueError, rf"labels: expected values in \[0, {V}\).*got {V}"),
        (dict(labels=torch.tensor([0, -1, 1, 2])), ValueError, "labels: .*got -1"),
        (dict(bias=torch.randn(V + 1)), ValueError, "bias: expected shape"),
        (dict(bias=torch.randn(V).double()), TypeError, "bias: expected dtype"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=math.nan), ValueError, "temperature"),
        (dict(backend="cuda"), ValueError, "backend: linear_logprobs supports"),
        (dict(backend="fast"), ValueError, "backend: expected 'auto'"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
    ],
)
def test_linear_logprobs_errors(kwargs, exc, match):
    hidden, weight, labels = head()
    args = dict(hidden=hidden, weight=weight, labels=labels) | kwargs
    with pytest.raises(exc, match=match):
        ops.linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_unavailable_backend_is_a_runtime_error():
    if torch.cuda.is_available():
        pytest.skip("cuda present")
    with pytest.raises(RuntimeError, match="'cuda' cannot run here"):
        ops.gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool), backend="cuda")


def test_linear_kl_errors():
    hidden, weight, labels = head()
    with pytest.raises(ValueError, match="ref_hidden: expected leading shape"):
        ops.linear_kl(hidden, weight, torch.randn(N + 1, H), weight)
    with pytest.raises(ValueError, match="ref_weight: expected 11 rows"):
        ops.linear_kl(hidden, weight, hidden, torch.randn(V + 1, H))
    with pytest.raises(TypeError, match="ref_weight: expected dtype"):
        ops.linear_kl(hidden, weight, hidden, weight.double())
    with pytest.raises(ValueError, match="labels"):
        ops.linear_kl(hidden, weight, hidden, weight, labels[:2])


def test_kl_penalty_errors():
    lp = torch.randn(3)
    with pytest.raises(ValueError, match="estimator: expected one of"):
        ops.kl_penalty(lp, lp, "k4")
    with pytest.raises(ValueError, match=r"ref_logprobs: expected shape \(3,\)"):
        ops.kl_penalty(lp, torch.randn(1))  # no silent broadcast
    with pytest.raises(TypeError, match="logprobs: expected dtype"):
        ops.kl_penalty(lp.long(), lp)


def test_gae_errors():
    r, v, m = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="values: expected shape"):
        ops.gae(r, torch.randn(1, 5), m)
    with pytest.raises(ValueError, match="response_mask: expected shape"):
        ops.gae(r, v, m[:, :4])
    with pytest.raises(ValueError, match="response_mask: expected only 0/1"):
        ops.gae(r, v, torch.full((2, 5), 0.5))
    with pytest.raises(ValueError, match="rewards: expected 2 dims"):
        ops.gae(r[0], v[0], m[0])
    with pytest.raises(TypeError, match="rewards: expected dtype"):
        ops.gae(r.double(), v, m)
    with pytest.raises(ValueError, match="gamma"):
        ops.gae(r, v, m, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        ops.gae(r, v, m, lam=-0.1)
    bad = r.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="rewards/values: non-finite"):
        ops.gae(bad, v, m)
    m2 = m.clone()
    m2[1, 2] = False
    ops.gae(bad, v, m2)  # a NaN at a masked position is never read


def test_ppo_loss_errors():
    lp, old, adv, mask = tokens()
    with pytest.raises(ValueError, match="clip_eps"):
        ops.ppo_policy_loss(lp, old, adv, mask, clip_eps=0.0)
    with pytest.raises(ValueError, match="clip_eps_high"):
        ops.ppo_policy_loss(lp, old, adv, mask, clip_eps_high=-0.1)
    with pytest.raises(ValueError, match="dual_clip: expected a finite number > 1"):
        ops.ppo_policy_loss(lp, old, adv, mask, dual_clip=0.9)
    with pytest.raises(ValueError, match="loss_agg: expected one of"):
        ops.ppo_policy_loss(lp, old, adv, mask, loss_agg="mean")
    with pytest.raises(ValueError, match="loss_agg: 'seq-mean-token-mean' needs"):
        ops.ppo_policy_loss(lp[0], old[0], adv[0], mask[0], loss_agg="seq-mean-token-mean")
    with pytest.raises(ValueError, match="advantages: expected shape"):
        ops.ppo_policy_loss(lp, old, adv[:, :3], mask)  # no silent broadcast ([B] and [B, 1] are per-sequence advantages)
    with pytest.raises(ValueError, match="response_mask: expected shape"):
        ops.ppo_policy_loss(lp, old, adv, mask[0])
    with pytest.raises(ValueError, match="returns: expected shape"):
        ops.ppo_value_loss(lp, old, adv[0], mask)
    with pytest.raises(ValueError, match="clip_eps"):
        ops.ppo_value_loss(lp, old, adv, mask, clip_eps=-1)


def test_linear_ppo_loss_errors():
    hidden, weight = torch.randn(2, 5, H), torch.randn(V, H)
    labels = torch.randint(0, V, (2, 5))
    lp, old, adv, mask = tokens()
    with pytest.raises(ValueError, match="ref_logprobs: required when kl_coef > 0"):
        ops.linear_ppo_loss(hidden, weight, labels, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="advantages: expected shape"):
        ops.linear_ppo_loss(hidden, weight, labels, old[:, :3], adv[:, :3], mask[:, :3])
    with pytest.raises(ValueError, match="old_logprobs: expected shape"):
        ops.linear_ppo_loss(hidden, weight, labels, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="entropy_coef"):
        ops.linear_ppo_loss(hidden, weight, labels, old, adv, mask, entropy_coef=-1.0)
    with pytest.raises(ValueError, match="kl_estimator"):
        ops.linear_ppo_loss(hidden, weight, labels, old, adv, mask, kl_estimator="k9")
    bad = labels.clone()
    bad[0, 0] = -100
    with pytest.raises(ValueError, match="labels: ignore_index at a position where response_mask is true"):
        ops.linear_ppo_loss(hidden, weight, bad, old, adv, mask)


def test_masked_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="mask: expected shape"):
        ops.masked_mean(x, torch.ones(4, dtype=torch.bool))  # no silent broadcast
    with pytest.raises(ValueError, match="at least 2 valid entries, got 1"):
        ops.masked_whiten(x, torch.eye(3, 4, dtype=torch.bool)[:1].expand(3, 4) & (torch.arange(3)[:, None] == 0))
    with pytest.raises(TypeError, match="mask: expected a bool or 0/1 tensor"):
        ops.masked_mean(x, torch.ones(3, 4, dtype=torch.complex64))

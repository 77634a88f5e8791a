"""The fused ops under torch.compile: custom ops whose fake implementations and autograd pass ``opcheck``, no graph
break in a model's forward, compiled forward + backward equal to eager, and value checks that never read the device
on the host under compile (a device-side assert instead).

CPU, backend "torch" (triton: opcheck's schema and fake-shape tests), tiny shapes. The compiled side runs on
"aot_eager" (dynamo + AOTAutograd: fake shapes, registered autograd, functionalization; static and dynamic shapes)
and, once, on inductor."""
import copy
import functools

import pytest
import torch
import torch._dynamo
from conftest import backends_for, rel_err
from torch import nn

from rlhf_fast import ops
from rlhf_fast.ops._torch import Transform

B, T, H, V = 2, 5, 8, 37


class Tiny(nn.Module):
    """Embedding + Linear trunk and an LM head whose weight (and bias) the fused ops take."""

    def __init__(self, bias: bool):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.body = nn.Linear(H, H)
        self.head = nn.Linear(H, V, bias=bias)

    def forward(self, ids):
        return torch.tanh(self.body(self.embed(ids)))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False  # padding
    mask[1, 1] = False  # a hole
    labels[~mask] = -100
    old = torch.randn(B, T, generator=g) * 0.3 - 3.6  # ratios on both sides of the clip
    ref = torch.randn(B, T, generator=g) * 0.3 - 3.6
    adv = torch.randn(B, T, generator=g)
    return ids, labels, mask, old, ref, adv


def logprobs_loss(model, ref_model, ids, labels, mask, old, ref, adv, backend="torch"):
    lp, ent = ops.linear_logprobs(model(ids), model.head.weight, labels, bias=model.head.bias, return_entropy=True,
                                  temperature=0.7, backend=backend, chunk_size=3)
    return -(lp.sum() + 0.1 * ent.sum()), lp


def kl_loss(model, ref_model, ids, labels, mask, old, ref, adv, backend="torch"):
    with torch.no_grad():
        ref_h = ref_model(ids)
    kl = ops.linear_kl(model(ids), model.head.weight, ref_h, ref_model.head.weight, labels, bias=model.head.bias,
                       ref_bias=ref_model.head.bias, softcap=5.0, backend=backend, chunk_size=3)
    return kl.sum(), kl


def ppo_loss(model, ref_model, ids, labels, mask, old, ref, adv, backend="torch", **kw):
    loss, stats = ops.linear_ppo_loss(model(ids), model.head.weight, labels, old, adv, mask, bias=model.head.bias,
                                      entropy_coef=0.01, ref_logprobs=ref, kl_coef=0.05, dual_clip=3.0, backend=backend,
                                      chunk_size=3, **kw)
    return loss, stats["logprobs"]


def on_policy_seq_loss(*args, **kw):
    return ppo_loss(*args[:5], None, *args[6:], importance_ratio="sequence", loss_agg="seq-mean-token-mean", **kw)


LOSSES = [logprobs_loss, kl_loss, ppo_loss, on_policy_seq_loss]


def models(bias):
    torch.manual_seed(0)
    model = Tiny(bias)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, ref_model.requires_grad_(False)


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_no_graph_break(loss_fn):
    model, ref_model = models(bias=True)
    explained = torch._dynamo.explain(loss_fn)(model, ref_model, *batch())
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def run(fn, model, ref_model, data):
    model.zero_grad()
    loss, out = fn(model, ref_model, *data)
    loss.backward()
    return loss.detach(), out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("loss_fn", LOSSES)
@pytest.mark.parametrize("bias, dynamic", [(False, False), (True, True)])
def test_compiled_forward_and_backward_equal_eager(loss_fn, bias, dynamic):
    model, ref_model = models(bias)
    data = batch(1)
    eager = run(loss_fn, model, ref_model, data)
    torch._dynamo.reset()
    compiled = run(torch.compile(loss_fn, backend="aot_eager", fullgraph=True, dynamic=dynamic), model, ref_model, data)
    assert rel_err(compiled[0], eager[0]) <= 1e-6 and rel_err(compiled[1], eager[1]) <= 1e-6
    assert eager[2].keys() == compiled[2].keys()
    for k, g in eager[2].items():
        assert rel_err(compiled[2][k], g) <= 1e-6, k


def test_inductor_equals_eager():
    model, ref_model = models(bias=True)
    data = batch(2)
    eager = run(ppo_loss, model, ref_model, data)
    torch._dynamo.reset()
    compiled = run(torch.compile(ppo_loss, fullgraph=True), model, ref_model, data)
    for a, b in zip(compiled[:2] + tuple(compiled[2].values()), eager[:2] + tuple(eager[2].values())):
        assert rel_err(a, b) <= 1e-6


def head(seed, bias=True, n=7):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g).div(H**0.5).requires_grad_()
    b = torch.randn(V, generator=g, requires_grad=True) if bias else None
    labels = torch.randint(0, V, (n,), generator=g)
    labels[2] = -100
    return hidden, weight, b, labels


TF = Transform.of(0.7, 1.3, 4.0)
ALL = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")  # opcheck's default
# Interpreted triton is slow: there opcheck tries the schema and the fake shapes only, not autograd and AOT dispatch.
OPCHECK = [pytest.param(b, ALL if b == "torch" else ("test_schema", "test_faketensor"), id=b) for b in backends_for("torch", "triton")]


@pytest.mark.parametrize("backend, utils", OPCHECK)
@pytest.mark.parametrize("return_entropy", [False, True])
def test_opcheck_logprobs(return_entropy, backend, utils):
    hidden, weight, bias, labels = head(3)
    args = (hidden, weight, bias, labels, TF.mult, TF.cap, -100, return_entropy, 3, backend)
    torch.library.opcheck(torch.ops.rlhf_fast.linear_logprobs.default, args, test_utils=utils)
    with torch.no_grad():
        lp, ent, stats = torch.ops.rlhf_fast.linear_logprobs(*args)
    g_ent = torch.randn_like(ent) if return_entropy else None
    bwd = (torch.randn_like(lp), g_ent, hidden.detach(), weight.detach(), bias.detach(), labels, stats,
           ent if return_entropy else None, TF.mult, TF.cap, -100, 3, backend, True, True, True)
    torch.library.opcheck(torch.ops.rlhf_fast.linear_logprobs_backward.default, bwd, test_utils=utils)


@pytest.mark.parametrize("backend, utils", OPCHECK)
def test_opcheck_kl(backend, utils):
    hidden, weight, bias, labels = head(4)
    ref_hidden, ref_weight, _, _ = head(5)
    args = (hidden, weight, bias, ref_hidden.detach(), ref_weight.detach(), None, labels != -100, TF.mult, TF.cap, 3, backend)
    torch.library.opcheck(torch.ops.rlhf_fast.linear_kl.default, args, test_utils=utils)
    with torch.no_grad():
        kl, stats = torch.ops.rlhf_fast.linear_kl(*args)
    bwd = (torch.randn_like(kl), *(x.detach() if isinstance(x, torch.Tensor) else x for x in args[:7]), kl, stats,
           TF.mult, TF.cap, 3, backend, True, False, True)
    torch.library.opcheck(torch.ops.rlhf_fast.linear_kl_backward.default, bwd, test_utils=utils)


@pytest.mark.parametrize("backend, utils", OPCHECK)
@pytest.mark.parametrize("on_policy", [False, True])
def test_opcheck_ppo_loss(on_policy, backend, utils):
    hidden, weight, bias, labels = head(6)
    g = torch.Generator().manual_seed(7)
    mask = labels != -100
    weights = mask.float() / mask.sum()
    adv, old, ref = torch.randn(7, generator=g), torch.randn(7, generator=g) - 3.6, torch.randn(7, generator=g) - 3.6
    args = (hidden, weight, bias, labels, mask, weights, adv, None if on_policy else old, ref, "ppo_clip", 0.2, 0.28, 3.0,
            1.0, 1.05, 0.01, 0.05, "k3", 20.0, TF.mult, TF.cap, -100, 3, backend, True, True, True)
    torch.library.opcheck(torch.ops.rlhf_fast.linear_ppo_loss.default, args, test_utils=utils)


def test_bad_labels_under_compile_fail_on_the_device():
    hidden, weight, _, labels = head(8, bias=False)
    f = torch.compile(lambda h, w, y: ops.linear_logprobs(h, w, y, backend="torch"), backend="aot_eager", fullgraph=True)
    f(hidden, weight, labels)
    bad = labels.clone()
    bad[0] = V
    with pytest.raises(RuntimeError, match="labels: expected values in"):
        f(hidden, weight, bad)


def test_bad_mask_under_compile_fails_on_the_device():
    hidden, weight, _, labels = head(9, bias=False, n=B * T)
    labels = labels.clamp(min=0).view(B, T)
    adv, old = torch.randn(B, T), torch.randn(B, T) - 3.6
    f = torch.compile(lambda m: ops.linear_ppo_loss(hidden.view(B, T, H), weight, labels, old, adv, m, backend="torch")[0],
                      backend="aot_eager", fullgraph=True)
    f(torch.ones(B, T))
    with pytest.raises(RuntimeError, match="response_mask: expected only 0/1 entries"):
        f(torch.full((B, T), 0.5))


def test_check_inputs_true_checks_eagerly_even_under_compile():
    hidden, weight, _, labels = head(10, bias=False)
    labels[0] = V
    f = torch.compile(lambda h, w, y: ops.linear_logprobs(h, w, y, backend="torch", check_inputs=True), backend="aot_eager")
    with pytest.raises(ValueError, match=rf"labels: expected values in \[0, {V}\) or ignore_index=-100, got {V}"):
        f(hidden, weight, labels)


def test_check_inputs_false_reads_no_values():
    hidden, weight, _, labels = head(11, bias=False, n=B * T)
    hidden, labels = hidden.view(B, T, H), labels.clamp(min=0).view(B, T)
    adv, old = torch.randn(B, T), torch.randn(B, T) - 3.6
    unchecked, _ = ops.linear_ppo_loss(hidden, weight, labels, old, adv, torch.full((B, T), 0.5), backend="torch",
                                       check_inputs=False)  # not 0/1, but unchecked: nonzero counts as true
    loss, _ = ops.linear_ppo_loss(hidden, weight, labels, old, adv, torch.ones(B, T, dtype=torch.bool), backend="torch")
    assert torch.equal(unchecked, loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_fn", LOSSES)
def test_no_host_sync_on_cuda(loss_fn, backend):
    if backend not in ops.available_backends():
        pytest.skip(f"{backend} unavailable")
    model, ref_model = (m.cuda() for m in models(bias=True))
    data = [x.cuda() for x in batch(3)]
    run(functools.partial(loss_fn, backend=backend), model, ref_model, data)  # warm-up: first-call work may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(functools.partial(loss_fn, backend=backend), model, ref_model, data)
    finally:
        torch.cuda.set_sync_debug_mode("default")

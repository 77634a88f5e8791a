"""The "triton" backend against float64 references on materialized logits, through the public ops.

Runs on CPU under the Triton interpreter (TRITON_INTERPRET=1, set by conftest when there is no GPU) and on
CUDA when present. Shapes are small (the interpreter is slow) but awkward: vocabularies that are no multiple
of any tile, one token, odd hidden sizes, ignored labels, mask holes; and chosen so that the forward spans
several vocabulary splits, the backward several vocabulary chunks and the single-pass loss several token
chunks (test_cases_cover_splits_and_chunks checks that they still do).
"""
import json
import os

import pytest
import torch

from conftest import composed_ppo_loss, f64, leaf, make_inputs, rel_err
from rlhf_fast import ops
from rlhf_fast.ops import reference as R

triton = pytest.importorskip("triton")
from rlhf_fast_kernels.fused_linear_loss import plan  # noqa: E402
from rlhf_fast_kernels.linear_logprobs import vocab_chunk, vocab_splits  # noqa: E402
from rlhf_fast_kernels.matmul import matmul_acc  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.skipif(not DEVICES, reason="triton needs a GPU or TRITON_INTERPRET=1")


def tol(dtype, device):
    if dtype == torch.float32:
        return 1e-5 if device == "cpu" else 1e-4  # GPU: other summation orders, cuBLAS for the fp32 GEMMs
    return 1e-2


# (tokens, H, V, bias, temperature, ignore_frac)
LOGPROB_CASES = [
    (1, 3, 1, False, 1.0, 0.0),  # one token, one word, H below any tile
    (1, 67, 257, True, 0.7, 0.0),
    (37, 67, 257, True, 0.7, 0.3),  # several splits, backward chunks, token tiles
    (64, 16, 300, False, 2.5, 0.3),
    (20, 33, 130, True, 1.0, 0.6),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", LOGPROB_CASES, ids=lambda c: "n{}-h{}-v{}-b{}-t{}-i{}".format(*c))
def test_linear_logprobs_values_and_gradients(device, dtype, case):
    n, hdim, v, bias, temperature, ignore_frac = case
    hidden, weight, b, labels = make_inputs(n * 7 + v, n, hdim, v, dtype, device, bias=bias, ignore_frac=ignore_frac)
    h, w, bb = leaf(hidden), leaf(weight), leaf(b)
    lp, ent = ops.linear_logprobs(h, w, labels, bias=bb, temperature=temperature, return_entropy=True, backend="triton")
    rh, rw, rb = f64(hidden), f64(weight), f64(b)
    ref_lp, ref_ent = R.linear_logprobs(rh, rw, labels.cpu(), rb, temperature, return_entropy=True)
    t = tol(dtype, device)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == labels.shape
    assert rel_err(lp, ref_lp) <= t and rel_err(ent, ref_ent) <= t
    ignored = labels == -100
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()

    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    (lp * g_lp.float().to(device) + ent * g_ent.float().to(device)).sum().backward()
    (ref_lp * g_lp + ref_ent * g_ent).sum().backward()
    for ours, ref in ((h, rh), (w, rw), (bb, rb)):
        if ours is not None:
            assert ours.grad.dtype == dtype and ours.grad.shape == ours.shape
            assert rel_err(ours.grad, ref.grad) <= 2 * t


@pytest.mark.parametrize("device", DEVICES)
def test_linear_logprobs_batched_shape_without_entropy(device):
    # [B, T, H] input; only log-probs requested, so the entropy terms are skipped in both kernels.
    hidden, weight, _, labels = make_inputs(3, 0, 16, 130, torch.float32, device, lead=(3, 7))
    h, w = leaf(hidden), leaf(weight)
    lp = ops.linear_logprobs(h, w, labels, backend="triton")
    assert isinstance(lp, torch.Tensor) and lp.shape == (3, 7)
    g = torch.randn(3, 7, dtype=torch.float64)
    (lp * g.float().to(device)).sum().backward()
    rh, rw = f64(hidden), f64(weight)
    ref = R.linear_logprobs(rh, rw, labels.cpu())
    (ref * g).sum().backward()
    assert rel_err(lp, ref) <= 1e-5
    assert rel_err(h.grad, rh.grad) <= 2e-5 and rel_err(w.grad, rw.grad) <= 2e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.01])
def test_linear_logprobs_extreme_logits(device, dtype, temperature):
    # |z| ~ 1e4 (1e6 after temperature 0.01): the online log-sum-exp must neither overflow nor lose log p.
    hidden, weight, _, labels = make_inputs(2, 11, 16, 130, dtype, device, ignore_frac=0.0)
    hidden = (hidden.float() * 2500).to(dtype)
    h, w = leaf(hidden), leaf(weight)
    lp, ent = ops.linear_logprobs(h, w, labels, temperature=temperature, return_entropy=True, backend="triton")
    rh, rw = f64(hidden), f64(weight)
    ref_lp, ref_ent = R.linear_logprobs(rh, rw, labels.cpu(), None, temperature, return_entropy=True)
    assert ref_lp.abs().max() > 1e3
    assert rel_err(lp, ref_lp) <= tol(dtype, device)
    assert (ent.cpu().double() - ref_ent).abs().max() <= 1e-3 and (ent >= -1e-6).all()
    lp.sum().backward()
    ref_lp.sum().backward()
    # the gradient is (onehot - p) / T: nearly one-hot softmaxes make it O(1/T) per token, compare absolutely
    for ours, ref in ((h, rh), (w, rw)):
        scale = ref.grad.abs().max().item() + 1.0
        if scale > torch.finfo(dtype).max / 2:
            continue  # fp16 dweight ~ 1e6 at T = 0.01: no fp16 result can hold it
        assert torch.isfinite(ours.grad).all()
        assert (ours.grad.cpu().double() - ref.grad).abs().max() <= 1e-2 * scale


@pytest.mark.parametrize("device", DEVICES)
def test_linear_logprobs_all_ignored(device):
    hidden, weight, b, labels = make_inputs(3, 6, 3, 37, torch.float32, device, bias=True)
    labels[:] = -100
    h, w, bb = leaf(hidden), leaf(weight), leaf(b)
    lp, ent = ops.linear_logprobs(h, w, labels, bias=bb, return_entropy=True, backend="triton")
    (lp.sum() + ent.sum()).backward()
    for t in (lp, ent, h.grad, w.grad, bb.grad):
        assert (t == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_linear_logprobs_is_deterministic(device):
    # No atomics: forward and all gradients are bitwise identical from run to run.
    hidden, weight, b, labels = make_inputs(4, 37, 67, 257, torch.bfloat16, device, bias=True)
    outs = []
    for _ in range(2):
        h, w, bb = leaf(hidden), leaf(weight), leaf(b)
        lp, ent = ops.linear_logprobs(h, w, labels, bias=bb, return_entropy=True, backend="triton")
        (lp * 0.5 - ent).sum().backward()
        outs.append((lp, ent, h.grad, w.grad, bb.grad))
    for a, c in zip(*outs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [(1, 16, 16, 7, False), (23, 67, 16, 257, True), (40, 33, 67, 130, False)],
                         ids=lambda c: "n{}-h{}-hr{}-v{}-labels{}".format(*c))
def test_linear_kl_values_and_gradients(device, dtype, case):
    n, hdim, hr, v, use_labels = case
    hidden, weight, _, labels = make_inputs(n + v, n, hdim, v, dtype, device)
    g = torch.Generator().manual_seed(n)
    ref_hidden = torch.randn(n, hr, generator=g).to(dtype).to(device)
    ref_weight = torch.randn(v, hr, generator=g).div(hr**0.5).to(dtype).to(device)
    labels = labels if use_labels else None
    h, w = leaf(hidden), leaf(weight)
    kl = ops.linear_kl(h, w, ref_hidden, ref_weight, labels, temperature=0.8, backend="triton")
    rh, rw = f64(hidden), f64(weight)
    ref = R.linear_kl(rh, rw, f64(ref_hidden), f64(ref_weight), None if labels is None else labels.cpu(), 0.8)
    t = tol(dtype, device)
    assert kl.dtype == torch.float32 and kl.shape == (n,)
    assert rel_err(kl, ref) <= t
    if labels is not None:
        assert (kl[labels == -100] == 0).all()
    gk = torch.randn(n, generator=g, dtype=torch.float64)
    (kl * gk.float().to(device)).sum().backward()
    (ref * gk).sum().backward()
    assert rel_err(h.grad, rh.grad) <= 2 * t and rel_err(w.grad, rw.grad) <= 2 * t


@pytest.mark.parametrize("device", DEVICES)
def test_linear_kl_reference_in_another_dtype(device):
    # bf16 policy against an fp32 reference model: each side keeps its own precision.
    hidden, weight, _, labels = make_inputs(6, 19, 16, 130, torch.bfloat16, device)
    ref_hidden = (hidden.float() + 0.3 * torch.randn(hidden.shape, device=device))
    ref_weight = weight.float() + 0.05 * torch.randn(weight.shape, device=device)
    h, w = leaf(hidden), leaf(weight)
    kl = ops.linear_kl(h, w, ref_hidden, ref_weight, labels, backend="triton")
    rh, rw = f64(hidden), f64(weight)
    ref = R.linear_kl(rh, rw, f64(ref_hidden), f64(ref_weight), labels.cpu())
    assert rel_err(kl, ref) <= 1e-2
    kl.sum().backward()
    ref.sum().backward()
    assert rel_err(h.grad, rh.grad) <= 2e-2 and rel_err(w.grad, rw.grad) <= 2e-2


@pytest.mark.parametrize("device", DEVICES)
def test_linear_kl_identical_policies_is_zero_with_zero_gradient(device):
    hidden, weight, _, _ = make_inputs(7, 9, 16, 130, torch.float32, device)
    h, w = leaf(hidden), leaf(weight)
    kl = ops.linear_kl(h, w, hidden.clone(), weight.clone(), backend="triton")
    assert kl.abs().max() <= 1e-6
    kl.sum().backward()  # KL is minimal there: gradient 0
    assert h.grad.abs().max() <= 1e-5 and w.grad.abs().max() <= 1e-5


PPO_CASES = [
    # (B, T, H, V, chunk_size, loss_agg, clip, entropy_coef, kl_coef, kl_estimator, temperature)
    (3, 19, 67, 130, None, "token-mean", {}, 0.01, 0.05, "k3", 0.9),  # default chunk: several token chunks
    (2, 9, 16, 257, 5, "seq-mean-token-mean", {"clip_eps_high": 0.28}, 0.0, 0.1, "k1", 1.0),
    (4, 5, 3, 37, 64, "seq-mean-token-sum", {"dual_clip": 3.0}, 0.02, 0.0, "k3", 1.0),  # one chunk
    (1, 1, 16, 7, None, "token-mean", {}, 0.01, 0.2, "k2", 1.0),  # one token
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PPO_CASES, ids=lambda c: "b{}-t{}-h{}-v{}-c{}-{}".format(*c[:6]))
def test_linear_ppo_loss_equals_composed_ops(device, dtype, case):
    B, T, hdim, v, chunk, loss_agg, clip, entropy_coef, kl_coef, kl_estimator, temperature = case
    g = torch.Generator().manual_seed(B * 100 + T)
    hidden = torch.randn(B, T, hdim, generator=g).to(dtype)
    weight = torch.randn(v, hdim, generator=g).div(hdim**0.5).to(dtype)
    labels = torch.randint(0, v, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    if B > 1:
        mask[-1] = False  # a fully masked row
    mask.view(-1)[0] = True
    with torch.no_grad():
        base = R.linear_logprobs(hidden.double(), weight.double(), labels, temperature=temperature)
    old = (base + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()  # both sides of the clip
    ref = (base + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, T, generator=g)
    kw = dict(entropy_coef=entropy_coef, kl_coef=kl_coef, kl_estimator=kl_estimator, loss_agg=loss_agg, **clip)

    h, w = leaf(hidden.to(device)), leaf(weight.to(device))
    dev = lambda t: t.to(device)  # noqa: E731
    loss, stats = ops.linear_ppo_loss(h, w, dev(labels), dev(old), dev(adv), dev(mask), ref_logprobs=dev(ref),
                                      temperature=temperature, backend="triton", chunk_size=chunk, **kw)
    (3.0 * loss).backward()  # backward scales the gradients formed in forward

    rh, rw = f64(hidden), f64(weight)
    lp, ent = R.linear_logprobs(rh, rw, torch.where(mask, labels, -100), None, temperature, return_entropy=True)
    ref_loss = composed_ppo_loss(lp, ent, old.double(), adv.double(), mask, ref=ref.double(), **kw)
    (3.0 * ref_loss).backward()
    t = tol(dtype, device)
    assert abs(loss.item() - ref_loss.item()) <= t * (abs(ref_loss.item()) + 1.0)
    assert rel_err(stats["logprobs"], lp * mask) <= t and rel_err(stats["entropies"], ent * mask) <= t
    assert rel_err(h.grad, rh.grad, atol=1e-6) <= 2 * t and rel_err(w.grad, rw.grad, atol=1e-6) <= 2 * t
    assert h.grad.dtype == w.grad.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_linear_ppo_loss_matches_two_op_triton_path(device):
    # Same quantity two ways on the same backend: single pass vs linear_logprobs + ppo_policy_loss.
    hidden, weight, _, labels = make_inputs(9, 0, 33, 130, torch.float32, device, lead=(2, 21), ignore_frac=0.0)
    mask = torch.rand(2, 21, generator=torch.Generator().manual_seed(2)) > 0.25
    mask = mask.to(device)
    old = torch.full((2, 21), -4.5, device=device)
    adv = torch.randn(2, 21, generator=torch.Generator().manual_seed(3)).to(device)
    h1, w1, h2, w2 = leaf(hidden), leaf(weight), leaf(hidden), leaf(weight)
    loss1, _ = ops.linear_ppo_loss(h1, w1, labels, old, adv, mask, backend="triton")
    loss1.backward()
    lp = ops.linear_logprobs(h2, w2, torch.where(mask, labels, -100), backend="triton")
    loss2, _ = ops.ppo_policy_loss(lp, old, adv, mask)
    loss2.backward()
    assert abs(loss1.item() - loss2.item()) <= 1e-5 * (1 + abs(loss2.item()))
    assert rel_err(h1.grad, h2.grad) <= 1e-5 and rel_err(w1.grad, w2.grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulating_paths_under_small_budgets(device, dtype, monkeypatch):
    # The GPU budgets put every test shape above in one vocabulary chunk / one token group, which would leave
    # the fp32 accumulators (matmul_acc, autotuned with its restore of C) unexercised on a GPU: shrink them.
    import rlhf_fast_kernels.fused_linear_loss as fl
    import rlhf_fast_kernels.linear_logprobs as ll

    monkeypatch.setattr(ll, "_BWD_BUFFER_MIN", 8 << 10)
    monkeypatch.setattr(ll, "_BWD_BUFFER_MAX", 8 << 10)
    monkeypatch.setattr(fl, "_CHUNK_BUFFER_BYTES", 32 << 10)
    n, v = 40, 600  # V: 3 backward chunks of >= 256 columns (the GPU granule), the last partial
    assert ll.vocab_chunk(n, 32, v, 4) < v and fl.plan(n, v, 4)[1] < n
    hidden, weight, _, labels = make_inputs(11, n, 32, v, dtype, device)
    h, w = leaf(hidden), leaf(weight)
    lp = ops.linear_logprobs(h, w, labels, backend="triton")
    g = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(device)
    (lp * g).sum().backward()
    rh, rw = f64(hidden), f64(weight)
    ref = R.linear_logprobs(rh, rw, labels.cpu())
    (ref * g.double().cpu()).sum().backward()
    t = tol(dtype, device)
    assert rel_err(lp, ref) <= t and rel_err(h.grad, rh.grad) <= 2 * t and rel_err(w.grad, rw.grad) <= 2 * t

    mask = (labels != -100).view(4, 10)
    old = (ref.detach().float().view(4, 10) + 0.2).to(device)
    adv = torch.randn(4, 10, generator=torch.Generator().manual_seed(6)).to(device)
    h1, w1 = leaf(hidden.view(4, 10, 32)), leaf(weight)
    loss, _ = ops.linear_ppo_loss(h1, w1, labels.view(4, 10), old, adv, mask, entropy_coef=0.01, backend="triton")
    loss.backward()
    rh, rw = f64(hidden.view(4, 10, 32)), f64(weight)
    lp64, ent64 = R.linear_logprobs(rh, rw, torch.where(mask, labels.view(4, 10), -100).cpu(), return_entropy=True)
    ref_loss = composed_ppo_loss(lp64, ent64, old.double().cpu(), adv.double().cpu(), mask.cpu(), entropy_coef=0.01,
                                 ref=None, kl_coef=0.0, kl_estimator="k3", loss_agg="token-mean")
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= t * (abs(ref_loss.item()) + 1.0)
    assert rel_err(h1.grad, rh.grad, atol=1e-6) <= 2 * t and rel_err(w1.grad, rw.grad, atol=1e-6) <= 2 * t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "B,T,hole_frac,gamma,lam",
    [(3, 5, 0.3, 0.99, 0.95), (7, 100, 0.3, 1.0, 0.95), (2, 300, 0.5, 0.99, 0.9), (1, 1, 0.0, 1.0, 1.0),
     (4, 64, 0.0, 0.9, 0.0), (1, 1000, 0.2, 1.0, 1.0)],
)
def test_gae_matches_per_row_recursion(device, B, T, hole_frac, gamma, lam):
    g = torch.Generator().manual_seed(B * T)
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) >= hole_frac
    if B >= 3:
        mask[1] = False  # a fully masked row
    adv, ret = ops.gae(rewards.to(device), values.to(device), mask.to(device), gamma=gamma, lam=lam, backend="triton")
    ref_adv, ref_ret = R.gae_per_row(rewards.double(), values.double(), mask, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == (B, T)
    assert rel_err(adv, ref_adv) <= 1e-5 and rel_err(ret, ref_ret) <= 1e-5
    assert (adv.cpu()[~mask] == 0).all() and (ret.cpu()[~mask] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,T,block_b", [(5, 300, 2), (9, 70, 4)])
def test_gae_forced_rows_per_program(device, B, T, block_b):
    # The plan the benchmark compares against: several rows per program, and time split as well.
    from rlhf_fast_kernels import gae as G

    n_chunks = G._plan(B, T, torch.device(device), block_b)[3]
    assert n_chunks > 1 or not INTERPRET
    g = torch.Generator().manual_seed(T)
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) >= 0.3
    adv, ret = G.gae(rewards.to(device), values.to(device), mask.to(device), 0.99, 0.95, block_b=block_b)
    ref_adv, ref_ret = R.gae_per_row(rewards.double(), values.double(), mask, 0.99, 0.95)
    assert rel_err(adv, ref_adv) <= 1e-5 and rel_err(ret, ref_ret) <= 1e-5


def test_gae_plan_fills_the_gpu_with_rows_before_splitting_time(monkeypatch):
    from rlhf_fast_kernels import gae as G

    monkeypatch.setattr(G, "interpreting", lambda: False)
    monkeypatch.setattr(G, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    assert G._plan(256, 4096, cuda) == (1, 1024, 4096, 1)  # 256 one-row programs, one launch
    assert G._plan(1024, 4096, cuda) == (2, 1024, 4096, 1)  # 512 programs of 2 rows
    assert G._plan(64, 4096, cuda) == (1, 1024, 1024, 4)  # 64 rows: time split in 4 (256 programs)
    assert G._plan(256, 4096, cuda, block_b=2) == (2, 1024, 2048, 2)  # the earlier plan, kept for comparison
    assert G._plan(4096, 64, cuda) == (16, 64, 64, 1)  # short rows: 16 per program still gives 256 programs
    for bad in (0, 3):
        with pytest.raises(ValueError, match="block_b"):
            G._plan(256, 4096, cuda, block_b=bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_acc_strided(device, dtype):
    # c += a @ b with transposed / sliced operands, as the chunked backward calls it.
    g = torch.Generator().manual_seed(5)
    a_full = torch.randn(50, 80, generator=g).to(dtype).to(device)
    a = a_full[:, 3:48].T  # [45, 50], non-contiguous
    b = torch.randn(50, 37, generator=g).to(dtype).to(device)
    c = torch.randn(45, 37, generator=g).to(device)
    want = c.double().cpu() + a.double().cpu() @ b.double().cpu()
    matmul_acc(c, a, b)
    assert rel_err(c, want) <= (1e-6 if dtype == torch.float32 else 1e-5)


@pytest.mark.skipif(not INTERPRET, reason="block sizes checked are the interpreter's")
def test_cases_cover_splits_and_chunks():
    # Guards the tests above against silently collapsing to one split / chunk if the budgets change.
    cpu = torch.device("cpu")
    assert vocab_splits(37, 257, cpu)[0] > 1 and vocab_splits(1, 7, cpu)[0] == 1
    assert vocab_chunk(37, 5, 257, 4) < 257 and vocab_chunk(64, 3, 300, 2) < 300
    chunk, group = plan(3 * 19, 130, 4)  # PPO_CASES[0] in fp32: several groups, several chunks in a group
    assert chunk < group < 3 * 19 and (3 * 19) % group != 0
    chunk, group = plan(3 * 19, 130, 2)  # ... in bf16: one group of several chunks
    assert chunk < group == 3 * 19
    from rlhf_fast_kernels.gae import _plan

    assert _plan(1, 1000, cpu)[3] > 1 and _plan(2, 300, cpu)[3] > 1  # time chunks


def test_autotune_candidates_follow_the_dot_kind():
    # by_dot_kind reads DOT_F32 wherever the launch put it (keyword or positional) and never empties the list.
    from rlhf_fast_kernels._common import by_dot_kind

    cfgs = [triton.Config({"BLOCK_K": k, "X": i}) for i, k in enumerate((64, 32, 64, 32))]
    assert [c.kwargs["X"] for c in by_dot_kind(cfgs, {}, DOT_F32=True)] == [1, 3]
    assert [c.kwargs["X"] for c in by_dot_kind(cfgs, {"DOT_F32": False})] == [0, 2]
    assert by_dot_kind(cfgs[:1], {}, DOT_F32=True) == cfgs[:1]  # the interpreter's single config stays


def test_interpreter_index_mend(monkeypatch):
    # Triton 3.6's interpreter makes a program id an int with int() of a 1-element array: an error in NumPy >= 2.4,
    # a DeprecationWarning before. The mend must convert without either, and wrap the installer only once.
    import warnings
    from types import SimpleNamespace

    import numpy as np
    from triton.runtime import interpreter

    import rlhf_fast_kernels._common as C

    def triton36_install(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", triton36_install)
    C._mend_interpreter_index()
    mended = interpreter._patch_lang_tensor
    C._mend_interpreter_index()
    assert interpreter._patch_lang_tensor is mended is not triton36_install

    class Tensor:
        pass

    mended(Tensor, SimpleNamespace(set_attr=setattr))
    pid = SimpleNamespace(handle=SimpleNamespace(data=np.array([5], dtype=np.int32)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Tensor.__index__(pid) == 5


def test_single_pass_plan_under_the_gpu_budget(monkeypatch):
    # 1 GiB shared as C x V fp32 logits + G x V bf16 dz, G = 3 C by default; a given C keeps it.
    import rlhf_fast_kernels.fused_linear_loss as fl

    monkeypatch.setattr(fl, "_CHUNK_BUFFER_BYTES", 1 << 30)
    v = 151936
    chunk, group = fl.plan(16384, v, 2)
    assert (chunk, group) == (640, 1920) and chunk * v * 4 + group * v * 2 <= 1 << 30
    assert fl.plan(16384, v, 2, chunk_size=512) == (512, 2048)  # G takes what the budget leaves
    assert fl.plan(16384, v, 2, chunk_size=4096) == (4096, 4096)  # a C over budget still runs, G = C
    assert fl.plan(100, v, 2) == (100, 100)  # never more than the tokens there are


def test_backward_buffer_follows_hidden_size(monkeypatch):
    # The GPU budgets: a dz buffer ~ N*H elements between 64 and 512 MiB, Vc a multiple of the 256 granule.
    import rlhf_fast_kernels.linear_logprobs as ll

    monkeypatch.setattr(ll, "_BWD_BUFFER_MIN", 64 << 20)
    monkeypatch.setattr(ll, "_BWD_BUFFER_MAX", 512 << 20)
    monkeypatch.setattr(ll, "_SPLIT_GRANULE", 256)
    assert ll.vocab_chunk(16384, 4096, 151936, 2) == 4096  # 128 MiB: hidden's own size
    assert ll.vocab_chunk(4096, 4096, 128256, 2) == 8192  # 32 MiB -> the 64 MiB floor
    assert ll.vocab_chunk(65536, 8192, 151936, 2) == 4096  # 1 GiB -> the 512 MiB cap
    assert ll.vocab_chunk(1 << 20, 4096, 151936, 2) == 256  # never below one granule
    assert ll.vocab_chunk(512, 896, 1000, 4) == 1000  # never above the vocabulary


# Compiles every kernel for Hopper (sm_90) with the GPU configs, in a subprocess without TRITON_INTERPRET: the
# interpreter accepts some programs that the compiler rejects (layouts, scan lowering, dtypes of dot operands).
_AOT_SCRIPT = r"""
import json, pathlib, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlhf_fast_kernels import fused_linear_loss as FL, gae as G, linear_kl as KL, linear_logprobs as LP, matmul as MM
from rlhf_fast_kernels._common import by_dot_kind

# ints a real launch sees as multiples of 16 (hidden sizes, strides, vocabulary splits) get the same hint here
DIV16 = {"H", "HR", "V", "K", "M", "N", "T", "stride_h", "stride_w", "stride_rh", "stride_rw", "stride_logits",
         "stride_out", "stride_z", "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "v_per_split",
         "v_start", "v_end", "chunk_len"}
FLOATS = {"inv_temp", "cap", "gamma", "gl"}
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
report = []

def spill_bytes(ptx):
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        r = subprocess.run([str(PTXAS), "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"], capture_output=True, text=True, check=True)
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", r.stderr))

def build(kernel, ptrs, consts, cfg=None, check=True):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    consts = dict(consts, **(cfg.kwargs if cfg else {}))
    default = lambda n: "*fp32" if n.endswith("_ptr") else "fp32" if n in FLOATS else "i32"
    sig = {n: "constexpr" if n in consts else ptrs.get(n, default(n)) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and (sig[n].startswith("*") or n in DIV16)}
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs)
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages} if cfg else {"num_warps": 4}
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    if check:  # GEMM kernels: registers that fit, and (bf16) Hopper's wgmma instructions
        ptx = compiled.asm["ptx"]
        report.append(dict(kernel=fn.__name__, dtype=ptrs["h_ptr" if "h_ptr" in ptrs else "a_ptr"], config=str(cfg),
                           softcap=bool(consts.get("HAS_SOFTCAP")), wgmma="wgmma" in ptx, spill=spill_bytes(ptx)))

for dt in ("bf16", "fp32"):
    f32 = dt == "fp32"
    flags = dict(DOT_F32=f32, IEEE=f32)
    ref = dict(REF_DOT_F32=f32, REF_IEEE=f32)
    p = f"*{dt}"
    for cfg in by_dot_kind(LP._GEMM_CONFIGS, {}, DOT_F32=f32):  # every autotune candidate the launch can pick
        for store in (False, True):  # the softcap's tanh compiled in one of the two
            build(LP._stats_kernel, dict(h_ptr=p, w_ptr=p, b_ptr=p, labels_ptr="*i64", logits_ptr="*fp32", part_ptr="*fp32"),
                  dict(HAS_BIAS=True, ENTROPY=True, STORE_LOGITS=store, HAS_SOFTCAP=store, **flags), cfg)
        ptrs = dict(h_ptr=p, w_ptr=p, b_ptr=p, labels_ptr="*i64", rh_ptr=p, rw_ptr=p, rb_ptr=p, out_ptr=p)
        for kl in (False, True):
            for cap in (False, True):
                build(LP._dlogits_kernel, ptrs, dict(HAS_BIAS=not kl, ENTROPY=not kl, KL=kl, HAS_REF_BIAS=kl and cap,
                                                     HAS_SOFTCAP=cap, **flags, **ref), cfg)
        for cap in (False, True):  # today's path, and biases + softcap on both logits tiles
            build(KL._kl_stats_kernel, dict(h_ptr=p, w_ptr=p, b_ptr=p, rh_ptr=p, rw_ptr=p, rb_ptr=p),
                  dict(HAS_BIAS=cap, HAS_REF_BIAS=cap, HAS_SOFTCAP=cap, **flags, **ref), cfg)
    # A launch turns an int equal to 1 into a constexpr: compile the unit strides of the two callers' layouts,
    # dh += dz @ weight[chunk] (linear_logprobs) and dw += dz.T @ hidden[group] (fused_linear_loss).
    for unit in (("stride_ak", "stride_bn", "stride_cn"), ("stride_am", "stride_bn", "stride_cn")):
        for cfg in by_dot_kind(MM._CONFIGS, {}, DOT_F32=f32):
            build(MM._matmul_acc_kernel, dict(a_ptr=p, b_ptr=p, c_ptr="*fp32"), dict(flags, **dict.fromkeys(unit, 1)), cfg)
    for cap in (False, True):
        build(FL._dlogits_from_logits_kernel, dict(labels_ptr="*i64", out_ptr=p), dict(ENTROPY=True, HAS_SOFTCAP=cap),
              FL._ELEMENTWISE_CONFIGS[0], check=False)
for kernel in (G._chunk_summary_kernel, G._gae_scan_kernel):
    for block_b, block_t in ((1, 1024), (2, 16)):
        build(kernel, dict(m_ptr="*u8"), dict(BLOCK_B=block_b, BLOCK_T=block_t), check=False)
print(json.dumps(report))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the tests above compile and run every kernel")
def test_kernels_compile_for_hopper():
    import pathlib
    import subprocess
    import sys

    if not (pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton build ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert {row["kernel"] for row in report} == {"_stats_kernel", "_dlogits_kernel", "_kl_stats_kernel", "_matmul_acc_kernel"}
    assert {row["dtype"] for row in report} == {"*bf16", "*fp32"}
    bf16 = [row for row in report if row["dtype"] == "*bf16"]
    assert all(row["wgmma"] for row in bf16), [row for row in bf16 if not row["wgmma"]]
    # Spills in the GEMM main loop cost local-memory traffic on every K step; a few words in an epilogue do not.
    # Two variants hold more than one tile live: linear_kl's stats kernel (two logits tiles) and the softcapped stats
    # kernel (the logits tile and its tanh; triton 3.6's ptxas spills its bf16 128x64x64 4-stage candidate, 3.7's
    # does not). There some candidates may spill, since autotuning times them all, but at least one per dtype must not.
    crowded = lambda row: row["kernel"] == "_kl_stats_kernel" or (row["kernel"] == "_stats_kernel" and row["softcap"])
    heavy = [row for row in report if not crowded(row) and row["spill"] > 64]
    assert not heavy, heavy
    spills = {}  # (kernel, dtype, softcap) -> its candidates' spills
    for row in filter(crowded, report):
        spills.setdefault((row["kernel"], row["dtype"], row["softcap"]), []).append(row["spill"])
    assert len(spills) == 6 and all(min(s) <= 64 for s in spills.values()), spills  # linear_kl's 2 x 2, softcap's 2 dtypes

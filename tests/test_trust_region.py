"""TRPO machinery (Schulman et al. 2015, app. C) against float64 references built from the definitions:
the KL Hessian by autograd on materialized logits, the Fisher E[J^T (diag p - p p^T) J] from explicit Jacobians,
F^-1 g by torch.linalg.solve."""
import math

import pytest
import torch
from conftest import rel_err
from torch.nn.attention import SDPBackend, sdpa_kernel

from rlhf_fast.ops import linear_fisher_product
from rlhf_fast.trust_region import conjugate_gradient, line_search, make_fvp, trpo_step

D = torch.float64


def kl_sum(h, w, h_old, w_old, valid, temperature):
    """sum over valid tokens of KL(pi_old || pi) = sum_v p_old (log p_old - log p), logits materialized."""
    lp_old = torch.log_softmax(h_old @ w_old.T / temperature, -1)
    lp = torch.log_softmax(h @ w.T / temperature, -1)
    return ((lp_old.exp() * (lp_old - lp)).sum(-1) * valid).sum()


# measured max over 300 seeds: float64 3e-15; fp32 3e-6 (fp32 logits carry ~eps |z| error, |z| up to ~10 here)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("lead, chunk", [((5,), 2), ((2, 3), 1), ((5,), None)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_linear_fisher_product_is_kl_hessian(dtype, tol, lead, chunk, with_weight):
    g = torch.Generator().manual_seed(len(lead) + 3 * (chunk or 0) + 10 * with_weight)
    h, v, temperature = 4, 7, 0.7
    # inputs rounded to ``dtype`` first: the reference sees exactly the op's inputs
    hidden = (torch.randn(*lead, h, generator=g, dtype=D) * 1.5).to(dtype).to(D)
    weight = torch.randn(v, h, generator=g, dtype=D).to(dtype).to(D)
    labels = torch.randint(0, v, lead, generator=g)
    labels.view(-1)[[1, 3]] = -100
    valid = (labels != -100).to(D)
    n_h = hidden.numel()
    x = torch.cat([hidden.reshape(-1), weight.reshape(-1)])
    hess = torch.autograd.functional.hessian(
        lambda t: kl_sum(t[:n_h].view_as(hidden), t[n_h:].view_as(weight), hidden, weight, valid, temperature), x)
    for _ in range(3):
        dh, dw = (torch.randn(t.shape, generator=g, dtype=D).to(dtype).to(D) for t in (hidden, weight))
        dwt = dw if with_weight else torch.zeros_like(dw)
        ref = hess @ torch.cat([dh.reshape(-1), dwt.reshape(-1)])
        g_h, g_w = linear_fisher_product(hidden.to(dtype), weight.to(dtype), dh.to(dtype), dw.to(dtype) if with_weight else None,
                                         labels, temperature=temperature, chunk_size=chunk)
        assert g_h.dtype == dtype and g_h.shape == hidden.shape
        assert rel_err(g_h, ref[:n_h].view_as(hidden)) < tol
        assert bool((g_h[labels == -100] == 0).all())
        if with_weight:
            assert g_w.dtype == dtype and rel_err(g_w, ref[n_h:].view_as(weight)) < tol
        else:
            assert g_w is None


def test_linear_fisher_product_errors():
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    dh, dw = torch.randn(3, 4), torch.randn(5, 4)
    cases = [
        ({"d_hidden": dh.double()}, TypeError, "d_hidden"),
        ({"d_weight": torch.randn(5, 3)}, ValueError, "d_weight"),
        ({"weight": torch.randn(5, 3), "d_weight": torch.randn(5, 3)}, ValueError, "weight"),
        ({"labels": torch.tensor([0, 5, -100])}, ValueError, "labels"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"hidden": [1.0]}, TypeError, "hidden"),
    ]
    for kw, err, name in cases:
        args = {"hidden": hidden, "weight": weight, "d_hidden": dh, "d_weight": dw} | kw
        with pytest.raises(err, match=name):
            linear_fisher_product(**args)


def test_conjugate_gradient_solves_spd_system():
    g = torch.Generator().manual_seed(1)
    n = 12
    q = torch.randn(n, n, generator=g, dtype=D)
    a = q @ q.T + 0.5 * torch.eye(n, dtype=D)
    b = torch.randn(n, generator=g, dtype=D)
    x = conjugate_gradient(lambda v: a @ v, b, iters=3 * n, residual_tol=1e-28)
    assert rel_err(x, torch.linalg.solve(a, b)) < 1e-9
    # one iteration from x0 = 0 is the exact line minimum along b: x1 = (b.b / b.A b) b (Nocedal & Wright eq. 5.6)
    assert rel_err(conjugate_gradient(lambda v: a @ v, b, iters=1), (b @ b) / (b @ a @ b) * b) < 1e-14
    assert torch.equal(conjugate_gradient(lambda v: a @ v, torch.zeros(n, dtype=D)), torch.zeros(n, dtype=D))
    with pytest.raises(ValueError, match="iters"):
        conjugate_gradient(lambda v: v, b, iters=0)


class TinyPolicy:
    """float64 softmax policy: hidden = tanh(x A + a) B (2-layer MLP trunk), logits = hidden W^T / T."""

    def __init__(self, seed, n=6, d=3, h=4, v=5, temperature=0.8):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g, dtype=D)
        self.a_w = torch.randn(d, 6, generator=g, dtype=D).requires_grad_()
        self.a_b = torch.randn(6, generator=g, dtype=D).requires_grad_()
        self.b_w = torch.randn(6, h, generator=g, dtype=D).requires_grad_()
        self.w = torch.randn(v, h, generator=g, dtype=D).requires_grad_()
        self.mask = torch.tensor([True, False, True, True, False, True])
        self.actions = torch.randint(0, v, (n,), generator=g)
        self.adv = torch.randn(n, generator=g, dtype=D)
        self.t = temperature
        self.params = [self.a_w, self.a_b, self.b_w, self.w]
        self.old = self.logp().detach()

    def hidden(self, a_w=None, a_b=None, b_w=None):
        a_w, a_b, b_w = (self.a_w if a_w is None else a_w), (self.a_b if a_b is None else a_b), (self.b_w if b_w is None else b_w)
        return torch.tanh(self.x @ a_w + a_b) @ b_w

    def logp(self):
        return torch.log_softmax(self.hidden() @ self.w.T / self.t, -1)

    def surrogate(self):  # -mean_t ratio_t A_t over valid tokens (to minimise)
        lp = self.logp().gather(1, self.actions[:, None]).squeeze(1)
        lp_old = self.old.gather(1, self.actions[:, None]).squeeze(1)
        return -(torch.exp(lp - lp_old) * self.adv)[self.mask].mean()

    def kl(self):
        return (self.old.exp() * (self.old - self.logp())).sum(-1)[self.mask].mean()

    def fisher(self, params):
        """E_valid[J^T (diag p - p p^T) J] with J = dz/dtheta from explicit Jacobians, over the listed params."""
        sizes = [p.numel() for p in params]
        base = [p.detach() for p in self.params]

        def logits(flat):
            vals = dict(zip(map(id, params), (c.view_as(p) for c, p in zip(flat.split(sizes), params))))
            a_w, a_b, b_w, w = (vals.get(id(p), b) for p, b in zip(self.params, base))
            return self.hidden(a_w, a_b, b_w) @ w.T / self.t

        flat = torch.cat([p.detach().reshape(-1) for p in params])
        jac = torch.autograd.functional.jacobian(logits, flat)  # [N, V, P]
        p = torch.softmax(logits(flat), -1)
        f = torch.zeros(flat.numel(), flat.numel(), dtype=D)
        for i in self.mask.nonzero().flatten():
            m = torch.diag(p[i]) - torch.outer(p[i], p[i])
            f += jac[i].T @ m @ jac[i]
        return f / self.mask.sum()


@pytest.mark.parametrize("head_trainable", [True, False])
def test_make_fvp_and_cg_match_explicit_fisher(head_trainable):
    pol = TinyPolicy(2)
    params = pol.params if head_trainable else pol.params[:3]
    f = pol.fisher(params)
    damping = 0.05
    fvp = make_fvp(params, pol.hidden, pol.w, pol.mask, temperature=pol.t, damping=damping)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        v = torch.randn(f.shape[0], generator=g, dtype=D)
        assert rel_err(fvp(v), f @ v + damping * v) < 1e-12
    grad = torch.cat([t.reshape(-1) for t in torch.autograd.grad(pol.surrogate(), params)])
    x = conjugate_gradient(fvp, grad, iters=4 * f.shape[0], residual_tol=1e-30)
    assert rel_err(x, torch.linalg.solve(f + damping * torch.eye(f.shape[0], dtype=D), grad)) < 1e-8


def test_trpo_step_takes_the_natural_gradient_step_within_max_kl():
    pol = TinyPolicy(4)
    damping, max_kl = 0.05, 0.01
    f = pol.fisher(pol.params) + damping * torch.eye(sum(p.numel() for p in pol.params), dtype=D)
    grad = torch.cat([t.reshape(-1) for t in torch.autograd.grad(pol.surrogate(), pol.params)])
    old = torch.cat([p.detach().reshape(-1) for p in pol.params])
    loss0 = pol.surrogate().item()
    fvp = make_fvp(pol.params, pol.hidden, pol.w, pol.mask, temperature=pol.t, damping=damping)
    stats = trpo_step(pol.params, pol.surrogate, pol.kl, fvp, max_kl=max_kl, cg_iters=200, residual_tol=1e-30)
    assert stats["accepted"] and 0 < stats["kl"] <= max_kl
    with torch.no_grad():
        assert stats["kl"] == pytest.approx(pol.kl().item(), rel=1e-12)
        assert stats["improvement"] == pytest.approx(loss0 - pol.surrogate().item(), rel=1e-12) and stats["improvement"] > 0
    # Schulman 2015 app. C: s = -F^-1 g, scaled so that s^T F s / 2 = max_kl, times the line-search fraction
    s = -torch.linalg.solve(f, grad)
    expected = stats["step_frac"] * math.sqrt(2 * max_kl / (s @ f @ s)) * s
    assert rel_err(torch.cat([p.detach().reshape(-1) for p in pol.params]) - old, expected) < 1e-8


def test_trpo_step_zero_or_nan_gradient():
    pol = TinyPolicy(9)
    pol.adv.zero_()  # flat surrogate: no direction to move in
    old = [p.detach().clone() for p in pol.params]
    fvp = make_fvp(pol.params, pol.hidden, pol.w, pol.mask, temperature=pol.t, damping=0.1)
    stats = trpo_step(pol.params, pol.surrogate, pol.kl, fvp, max_kl=0.01)
    assert not stats["accepted"] and stats["grad_norm"] == 0.0
    assert all(torch.equal(p, o) for p, o in zip(pol.params, old))
    pol.adv[0] = float("nan")
    with pytest.raises(FloatingPointError, match="surrogate_fn"):
        trpo_step(pol.params, pol.surrogate, pol.kl, fvp, max_kl=0.01)
    assert all(torch.equal(p, o) for p, o in zip(pol.params, old))


def test_line_search_backtracks_into_the_trust_region():
    pol = TinyPolicy(5)
    grad = torch.cat([t.reshape(-1) for t in torch.autograd.grad(pol.surrogate(), pol.params)])
    old = [p.detach().clone() for p in pol.params]
    full = -0.1 * grad  # KL ~ 1 nat at the full step
    with torch.no_grad():
        loss0 = pol.surrogate().item()
    max_kl = 0.01
    stats = line_search(pol.params, full, float(-(grad @ full)), pol.surrogate, pol.kl, max_kl=max_kl)
    assert stats["accepted"] and stats["step_frac"] < 1 and stats["backtracks"] > 0
    frac = stats["step_frac"]
    assert frac == 0.5 ** stats["backtracks"]
    with torch.no_grad():
        assert 0 < pol.kl().item() <= max_kl and stats["kl"] == pol.kl().item()
        assert stats["improvement"] == loss0 - pol.surrogate().item() > 0
        # the previous (larger) fraction was rejected: it left the trust region or did not improve enough
        for p, o, c in zip(pol.params, old, (2 * frac * full).split([p.numel() for p in pol.params])):
            p.copy_(o + c.view_as(o))
        improve = loss0 - pol.surrogate().item()
        assert pol.kl().item() > max_kl or improve < 0.1 * 2 * frac * float(-(grad @ full))


def test_line_search_rejects_and_restores_exactly():
    pol = TinyPolicy(6)
    # a non-contiguous parameter, to check the flat round trip
    pol.b_w = pol.b_w.detach().T.contiguous().T.requires_grad_()
    pol.params[2] = pol.b_w
    assert not pol.b_w.is_contiguous()
    grad = torch.cat([t.reshape(-1) for t in torch.autograd.grad(pol.surrogate(), pol.params)])
    old = [p.detach().clone() for p in pol.params]
    uphill = 1e-3 * grad  # every fraction of it increases the loss
    stats = line_search(pol.params, uphill, float(grad @ uphill), pol.surrogate, pol.kl, max_kl=1.0, max_backtracks=4)
    assert not stats["accepted"] and stats["step_frac"] == 0.0 and stats["backtracks"] == 4
    assert all(torch.equal(p, o) for p, o in zip(pol.params, old))
    with pytest.raises(ValueError, match="expected_improve"):
        line_search(pol.params, uphill, 0.0, pol.surrogate, pol.kl, max_kl=1.0)
    with pytest.raises(ValueError, match="full_step"):
        line_search(pol.params, uphill[:-1], 1.0, pol.surrogate, pol.kl, max_kl=1.0)


def test_make_fvp_errors():
    pol = TinyPolicy(7)
    with pytest.raises(ValueError, match="params"):
        make_fvp([pol.w, pol.w], pol.hidden, pol.w)
    with pytest.raises(ValueError, match="damping"):
        make_fvp(pol.params, pol.hidden, pol.w, damping=-1.0)
    with pytest.raises(ValueError, match="response_mask"):
        make_fvp(pol.params, pol.hidden, pol.w, pol.mask[:-1])


@pytest.fixture(scope="module")
def tiny_policy_path(tmp_path_factory):
    from ppo_tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny"))["policy"]


def _llama(path, attn, dtype, head_trainable):
    from transformers import AutoModelForCausalLM

    from rlhf_fast.models import lm_head, train_top_layers

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype).eval()
    train_top_layers(model, 1)
    if head_trainable:  # tied: the head weight is also the input embedding, so it moves the trunk's hidden states too
        lm_head(model)[0].requires_grad_(True)
    return model, [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("head_trainable", [False, True])
def test_make_fvp_on_tiny_llama_matches_float64_double_backward(tiny_policy_path, attn, head_trainable):
    from rlhf_fast.models import backbone, hidden_states, lm_head

    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 300, (2, 9), generator=g)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :3] = 0  # left padding, as in rollouts
    response_mask = torch.zeros(ids.shape, dtype=torch.bool)
    response_mask[:, 4:] = True
    temperature = 0.8
    # reference: float64, materialized logits, Hessian-vector product by double backward of the mean KL
    # (sdpa: float64 eager attention gives NaN on the left-padded row in this transformers version)
    ref, ref_params = _llama(tiny_policy_path, "sdpa", D, head_trainable)
    w_ref = lm_head(ref)[0]
    with sdpa_kernel(SDPBackend.MATH):
        z_old = (hidden_states(backbone(ref), ids, attention_mask) @ w_ref.T / temperature).detach()
        lp_old = torch.log_softmax(z_old, -1)
        lp = torch.log_softmax(hidden_states(backbone(ref), ids, attention_mask) @ w_ref.T / temperature, -1)
        kl = (lp_old.exp() * (lp_old - lp)).sum(-1)[response_mask].mean()
        grads = torch.autograd.grad(kl, ref_params, create_graph=True)
    v = torch.randn(sum(p.numel() for p in ref_params), generator=g, dtype=D)
    gv = sum((gr * c.view_as(gr)).sum() for gr, c in zip(grads, v.split([p.numel() for p in ref_params])))
    fv_ref = torch.cat([t.reshape(-1) for t in torch.autograd.grad(gv, ref_params)])

    model, params = _llama(tiny_policy_path, attn, torch.float32, head_trainable)
    fvp = make_fvp(params, lambda: hidden_states(backbone(model), ids, attention_mask), lm_head(model)[0], response_mask,
                   temperature=temperature)
    fv = fvp(v.float())
    assert fv.dtype == torch.float32
    assert rel_err(fv, fv_ref) < 2e-6  # measured ~2.6e-7

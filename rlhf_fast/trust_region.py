"""Trust Region Policy Optimization for LM policies (Schulman et al. 2015, "Trust Region Policy Optimization", app. C).

One step: g = gradient of the surrogate loss L (minimised) at theta_old; s ~ -F^-1 g by conjugate gradient on
Fisher-vector products, F = Hessian at theta_old of the mean over valid tokens of KL(pi_old || pi_theta), exact
over the vocabulary (:func:`rlhf_fast.ops.linear_fisher_product`); full step beta s with beta = sqrt(2 max_kl / s^T F s),
where the quadratic model of the KL equals max_kl; then a backtracking line search on the true surrogate and KL.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .ops import _checks, linear_fisher_product


def _params(params) -> list[Tensor]:
    params = list(params)
    if not params or not all(isinstance(p, Tensor) and p.requires_grad for p in params):
        raise ValueError("params: expected a non-empty list of tensors that require grad")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("params: a tensor appears twice (tied weights must be listed once)")
    return params


def _nonneg(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    return float(v)


def _flat(tensors, params, dtype) -> Tensor:
    """Concatenated (reshape: non-contiguous params too), None read as zeros."""
    return torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1).to(dtype) for t, p in zip(tensors, params)])


def _unflat(flat: Tensor, params) -> list[Tensor]:
    return [c.view(p.shape).to(p.dtype) for c, p in zip(flat.split([p.numel() for p in params]), params)]


def _assign(params, olds, step: Tensor | None = None, frac: float = 0.0) -> None:
    """params = olds + frac * step (olds: exact copies, so frac = 0 restores bit-for-bit)."""
    with torch.no_grad():
        for p, o, c in zip(params, olds, [None] * len(params) if step is None else step.split([p.numel() for p in params])):
            p.copy_(o if c is None else o + frac * c.view(o.shape))


def _flat_dtype(params) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def conjugate_gradient(fvp: Callable[[Tensor], Tensor], b: Tensor, *, iters: int = 10, residual_tol: float = 1e-10) -> Tensor:
    """Approximate solution x of F x = b for symmetric positive-definite F given only v -> F v.

    Nocedal & Wright (2006) algorithm 5.2, as used by TRPO (Schulman et al. 2015, app. C), from x0 = 0. Stops after
    ``iters`` products, once the squared residual ||b - F x||^2 < ``residual_tol``, or on a direction of
    non-positive curvature (F not SPD numerically: x so far is returned, never NaN).

    Args: fvp: flat [n] -> flat [n]; b: [n] float tensor. Returns: x [n], b's dtype.
    Raises: TypeError / ValueError naming the argument.
    """
    _checks.float_tensor("b", b, ndim=1, dtypes=(torch.float32, torch.float64))
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: expected a positive int, got {iters!r}")
    residual_tol = _nonneg("residual_tol", residual_tol)
    x, r, p = torch.zeros_like(b), b.clone(), b.clone()
    rr = r.dot(r)
    for _ in range(iters):
        if rr < residual_tol:
            break
        fp = fvp(p)
        pfp = p.dot(fp)
        if not pfp > 0:
            break
        alpha = rr / pfp
        x.add_(alpha * p)
        r.sub_(alpha * fp)
        rr_new = r.dot(r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def make_fvp(params, hidden_fn: Callable[[], Tensor], weight: Tensor, response_mask: Tensor | None = None, *,
             temperature: float = 1.0, damping: float = 0.0, chunk_size: int | None = None) -> Callable[[Tensor], Tensor]:
    """v -> F v + damping v over the flat ``params``, F = Hessian at the current theta (= theta_old) of
    mean_{valid tokens} KL(pi_old || pi_theta), pi_theta = softmax(hidden_fn() @ weight.T / temperature), exact over V.

    F v = J_h^T g_hidden + (g_weight in weight's slot), (g_hidden, g_weight) = linear_fisher_product(h, W, J_h v, v_W)
    / n_valid. ``weight`` may be in ``params`` (then also the tied input embedding, through the trunk) or frozen.
    J_h v uses the double-vjp trick: with a dummy u, g(u) = J_h^T u = grad(h, params, u, create_graph=True) is linear
    in u, so grad(<g(u), v>, u) = J_h v. Chosen over forward-mode AD (torch.func.jvp + functional_call) because it
    needs only ``hidden_fn`` (any wrapper, tied weights), and the forward and the J^T graph are built once here and
    reused by every CG iteration: a product costs two backward-sized passes and no forward. It needs a twice-
    differentiable trunk: ``hidden_fn`` runs under the MATH sdpa backend, since the fused sdpa kernels have neither
    double backward nor forward AD ("derivative for _scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented"); with that, transformers' Llama passes with attn_implementation "eager" and "sdpa" (tests).
    flash_attention_2 has no double backward: load the policy with "sdpa" or "eager" for TRPO.

    Args:
        params: the trainable tensors (requires_grad, each listed once). hidden_fn: () -> hidden [..., H] with a graph
            to the trunk params; called once, here. weight: [V, H] LM-head weight, hidden's dtype.
        response_mask: bool or 0/1 [...] (hidden's leading shape): the tokens the mean runs over (None: all).
        temperature: > 0. damping: >= 0 (Tikhonov term keeping CG well-posed). chunk_size: tokens per chunk.
    Returns: fvp(v) for flat v [sum numel] float -> [sum numel], v's dtype; valid until the params change.
    Raises: TypeError / ValueError naming the argument.
    """
    params = _params(params)
    damping = _nonneg("damping", damping)
    _checks.positive("temperature", temperature)
    _checks.tensor("weight", weight, ndim=2)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU/GPU attention kernels have no double backward (nor forward AD)
        h = hidden_fn()
        _checks.tensor("hidden_fn()", h, min_ndim=1)
        m = torch.ones(h.shape[:-1], dtype=torch.bool, device=h.device) if response_mask is None else response_mask
        m = _checks.mask("response_mask", m, "hidden_fn()[..., 0]", h[..., 0]).reshape(-1)
        h = h.reshape(-1, h.shape[-1])[m]
        u = torch.zeros_like(h, requires_grad=True)
        jt = torch.autograd.grad(h, params, u, create_graph=True, allow_unused=True) if h.requires_grad else [None] * len(params)
    n = max(h.shape[0], 1)
    head = next((i for i, p in enumerate(params) if p is weight), None)
    live = [i for i, g in enumerate(jt) if g is not None and g.requires_grad]
    h_old, w_old = h.detach(), weight.detach()
    size = sum(p.numel() for p in params)

    def fvp(v: Tensor) -> Tensor:
        _checks.float_tensor("v", v, ndim=1, dtypes=(torch.float32, torch.float64))
        if v.numel() != size:
            raise ValueError(f"v: expected {size} entries (params flattened), got {v.numel()}")
        vs = _unflat(v, params)
        dh = torch.zeros_like(h_old)
        if live:
            dh = torch.autograd.grad([jt[i] for i in live], u, [vs[i] for i in live], retain_graph=True, allow_unused=True)[0]
            dh = torch.zeros_like(h_old) if dh is None else dh
        g_h, g_w = linear_fisher_product(h_old, w_old, dh, None if head is None else vs[head].to(w_old.dtype),
                                         temperature=temperature, chunk_size=chunk_size)
        out = [None] * len(params)
        if h.requires_grad:
            out = list(torch.autograd.grad(h, params, g_h / n, retain_graph=True, allow_unused=True))
        if head is not None:
            out[head] = g_w / n if out[head] is None else out[head] + g_w / n
        return _flat(out, params, v.dtype) + damping * v

    return fvp


def line_search(params, full_step: Tensor, expected_improve: float, surrogate_fn: Callable[[], Tensor],
                kl_fn: Callable[[], Tensor], *, max_kl: float, backtrack_ratio: float = 0.5, max_backtracks: int = 10,
                accept_ratio: float = 0.1, old_loss: float | None = None) -> dict:
    """Backtracking line search of TRPO (Schulman et al. 2015, app. C) on theta_old + frac * full_step.

    Tries frac = backtrack_ratio^k, k = 0..max_backtracks; accepts the first whose actual decrease of the surrogate
    loss is >= accept_ratio x its first-order prediction (frac x ``expected_improve``) and whose mean KL (``kl_fn``,
    nats) is <= ``max_kl``. Otherwise the params are restored bit-for-bit. At each trial ``surrogate_fn`` runs first,
    then ``kl_fn`` at the same params (a caller may reuse the forward pass between the two).

    Args: params: the tensors stepped in place; full_step: flat [sum numel]; expected_improve: > 0, -g . full_step;
        surrogate_fn / kl_fn: () -> 0-d tensor, evaluated under no_grad; old_loss: surrogate at theta_old if known.
    Returns: dict accepted (bool), step_frac (0 if rejected), kl, improvement (at the returned params), backtracks.
    Raises: TypeError / ValueError naming the argument.
    """
    params = _params(params)
    _checks.float_tensor("full_step", full_step, ndim=1, dtypes=(torch.float32, torch.float64))
    _checks.positive("expected_improve", expected_improve)
    max_kl = _checks.positive("max_kl", max_kl)
    ratio = _checks.in_range("backtrack_ratio", backtrack_ratio, 1e-6, 1 - 1e-6)
    accept_ratio = _nonneg("accept_ratio", accept_ratio)
    if isinstance(max_backtracks, bool) or not isinstance(max_backtracks, int) or max_backtracks < 0:
        raise ValueError(f"max_backtracks: expected an int >= 0, got {max_backtracks!r}")
    size = sum(p.numel() for p in params)
    if full_step.numel() != size:
        raise ValueError(f"full_step: expected {size} entries (params flattened), got {full_step.numel()}")
    olds = [p.detach().clone() for p in params]
    with torch.no_grad():
        loss0 = float(surrogate_fn()) if old_loss is None else float(old_loss)
        for k in range(max_backtracks + 1):
            frac = ratio**k
            _assign(params, olds, full_step, frac)
            improve, kl = loss0 - float(surrogate_fn()), float(kl_fn())
            if improve >= accept_ratio * frac * expected_improve and improve > 0 and kl <= max_kl:  # NaN fails each test
                return {"accepted": True, "step_frac": frac, "kl": kl, "improvement": improve, "backtracks": k}
        _assign(params, olds)
    return {"accepted": False, "step_frac": 0.0, "kl": 0.0, "improvement": 0.0, "backtracks": max_backtracks}


def trpo_step(params, surrogate_fn: Callable[[], Tensor], kl_fn: Callable[[], Tensor], fvp: Callable[[Tensor], Tensor], *,
              max_kl: float, cg_iters: int = 10, damping: float = 0.0, residual_tol: float = 1e-10, **search) -> dict:
    """One TRPO update of ``params`` in place (Schulman et al. 2015, app. C): step -F^-1 g scaled to the KL radius.

    Args:
        params: trainable tensors; surrogate_fn: () -> 0-d loss to MINIMISE (e.g. -mean ratio x advantage), with grad;
        kl_fn: () -> mean KL(pi_old || pi_theta), nats; fvp: v -> F v at theta_old (:func:`make_fvp`);
        max_kl: trust-region radius in nats; cg_iters, residual_tol: :func:`conjugate_gradient`;
        damping: >= 0, added to ``fvp`` (leave 0 if fvp already damps); search: :func:`line_search` options.
    Returns: the line-search stats plus loss (before), grad_norm, expected_improvement (full step, nats of loss).
    Raises: TypeError / ValueError naming the argument; FloatingPointError on a non-finite loss or gradient.
    """
    params = _params(params)
    max_kl = _checks.positive("max_kl", max_kl)
    damping = _nonneg("damping", damping)
    loss = surrogate_fn()
    _checks.float_tensor("surrogate_fn()", loss, ndim=0, dtypes=(torch.float32, torch.float64))
    g = _flat(torch.autograd.grad(loss, params, allow_unused=True), params, _flat_dtype(params))
    if not (torch.isfinite(loss) and torch.isfinite(g).all()):
        raise FloatingPointError("surrogate_fn: non-finite loss or gradient; no step taken")
    fd = (lambda v: fvp(v) + damping * v) if damping else fvp
    s = conjugate_gradient(fd, -g, iters=cg_iters, residual_tol=residual_tol)
    sfs = float(s.dot(fd(s)))
    stats = {"loss": float(loss.detach()), "grad_norm": float(g.norm()), "expected_improvement": 0.0}
    if not sfs > 0:  # zero gradient (or a degenerate F): nothing to do
        return stats | {"accepted": False, "step_frac": 0.0, "kl": 0.0, "improvement": 0.0, "backtracks": 0}
    full_step = s * math.sqrt(2 * max_kl / sfs)
    stats["expected_improvement"] = float(-g.dot(full_step))
    if not stats["expected_improvement"] > 0:
        return stats | {"accepted": False, "step_frac": 0.0, "kl": 0.0, "improvement": 0.0, "backtracks": 0}
    return stats | line_search(params, full_step, stats["expected_improvement"], surrogate_fn, kl_fn, max_kl=max_kl,
                               old_loss=stats["loss"], **search)

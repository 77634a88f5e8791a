"""rlhf_fast.integrations.trl.use_rlhf_fast: TRL 1.16's trainers on rlhf_fast's fused head and loss.

Two kinds of checks on a tiny random Llama (CPU, offline):

- ``GRPOTrainer._compute_loss`` on hand-built batches (rows of different lengths, an empty row, gradient
  accumulation 2, old / reference log-probs that make ratios clip): the reference is TRL's own ``_compute_loss``
  on a float64 copy of the model whose ``fused_lm_head=True`` call is replaced by log-probs / entropies taken from
  the model's own float64 logits (``ref_head``, written from the definition). rlhf_fast's fused loss (fp32) and
  TRL's own path (fp32) are both compared with it: loss, every parameter's gradient, the logged metrics.
- short real training runs (GRPO generation + updates, SFT) from one seed and one initial model, TRL's head
  against rlhf_fast's: the logged loss, grad_norm and metrics step by step.
"""
import copy
import os
import sys
import types
import warnings

import pytest
import torch
from conftest import rel_err

pytest.importorskip("trl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from datasets import Dataset
from ppo_tiny import make_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM
from trl import (
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    RLOOConfig,
    RLOOTrainer,
    SFTConfig,
    SFTTrainer,
)
from trl.trainer import utils as trl_utils

from rlhf_fast import ops
from rlhf_fast.integrations import hf
from rlhf_fast.integrations import trl as rt

TRL_ADD = trl_utils.add_fused_lm_head
# measured, fp32 (rlhf_fast's and TRL's alike) vs the float64 reference: loss |error| <= 6.4e-8 (on losses of
# 0.01-0.1 that are sums of cancelling +-A terms, hence absolute), gradients rel <= 1.2e-6, metrics <= 2.5e-7
LOSS_ATOL, TOL, GTOL = 5e-7, 2e-6, 5e-6
# Training runs use SGD: Adam's first steps normalise each gradient entry, so entries that are 0 +- rounding noise
# (e.g. a k3 KL gradient at pi = pi_ref, on tokens whose advantage is 0) become +-lr steps in either run, and two
# fp32 paths then part ways legitimately. With SGD the runs agree to rounding.
# measured between the two fp32 trainings (TRL's head vs rlhf_fast's): loss, grad_norm and metrics <= 6e-7
RUN_TOL = 3e-6
PROMPTS = ["Tell me a story", "What is rain?", "Name a fruit", "Why is the sky blue?"]


@pytest.fixture(autouse=True)
def _restored():
    yield
    rt.restore()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matmuls: intra-op threads only add synchronisation (4x slower on a busy 2-core machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    """The initial policy; saved, since GRPO with beta > 0 loads its reference model from config._name_or_path."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.1,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("policy")
    model.save_pretrained(path)
    model.config._name_or_path = str(path)
    return model


def reward(completions, **kwargs):
    # varied and deterministic on the text: random-weight completions need distinct rewards for nonzero advantages
    return [sum(map(ord, c)) % 13 / 13 for c in completions]


def grpo_args(tmp_path, **over):
    kw = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 8,
          "max_steps": 3, "logging_steps": 1, "report_to": [], "use_cpu": True, "bf16": False, "seed": 0, "optim": "sgd",
          "learning_rate": 1.0, "save_strategy": "no", "disable_tqdm": True}
    return GRPOConfig(**(kw | over))


def grpo_trainer(model, tok, tmp_path, **over):
    ds = Dataset.from_dict({"prompt": PROMPTS * 4})
    return GRPOTrainer(model=model, reward_funcs=reward, args=grpo_args(tmp_path, **over), train_dataset=ds, processing_class=tok)


def has_rlhf_fast_head(model) -> bool:
    inner = hf._unwrap(model)
    return getattr(inner.forward, "_rlhf_fast_fused", False) and inner in rt._hooked


@pytest.fixture
def count_fused(monkeypatch):
    """Counts linear_ppo_loss calls (the fused path); the wrapped op is the library's own."""
    calls = []
    real = ops.linear_ppo_loss

    def spy(*args, **kwargs):
        calls.append((args[3] is not None, kwargs.get("policy_loss", "ppo_clip")))  # (old log-probs given, surrogate)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "linear_ppo_loss", spy)
    return calls


@pytest.fixture
def count_head(monkeypatch):
    """Counts linear_logprobs calls (rlhf_fast's head: hf.add_fused_lm_head looks the op up at call time)."""
    calls = []
    real = ops.linear_logprobs

    def spy(*args, **kwargs):
        calls.append(args[0].shape[:-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "linear_logprobs", spy)
    return calls


# ---------------------------------------------------------------------------------------------- patching, errors
def test_patch_restore_and_context_manager():
    import trl.trainer.dpo_trainer as dpo
    import trl.trainer.grpo_trainer as grpo
    import trl.trainer.kto_trainer as kto
    import trl.trainer.rloo_trainer as rloo
    import trl.trainer.sft_trainer as sft

    modules = [trl_utils, grpo, rloo, dpo, sft, kto]
    assert all(m.add_fused_lm_head is TRL_ADD for m in modules)
    compute_loss = GRPOTrainer.__dict__["_compute_loss"]
    rt.use_rlhf_fast()
    rt.use_rlhf_fast()  # idempotent
    assert all(m.add_fused_lm_head is rt.add_fused_lm_head for m in modules)
    assert GRPOTrainer.__dict__["_compute_loss"] is compute_loss
    rt.use_rlhf_fast(fused_loss=True)
    assert GRPOTrainer.__dict__["_compute_loss"] is rt._grpo_compute_loss
    rt.restore()
    assert all(m.add_fused_lm_head is TRL_ADD for m in modules)
    assert GRPOTrainer.__dict__["_compute_loss"] is compute_loss
    rt.restore()  # no-op
    with rt.rlhf_fast_trl(fused_loss=True):
        assert grpo.add_fused_lm_head is rt.add_fused_lm_head and GRPOTrainer._compute_loss is rt._grpo_compute_loss
        with rt.rlhf_fast_trl():
            assert GRPOTrainer.__dict__["_compute_loss"] is compute_loss
        assert GRPOTrainer._compute_loss is rt._grpo_compute_loss  # the outer state is back
    assert grpo.add_fused_lm_head is TRL_ADD and GRPOTrainer.__dict__["_compute_loss"] is compute_loss


def test_errors(monkeypatch):
    import trl

    with pytest.raises(TypeError, match="fused_loss"):
        rt.use_rlhf_fast(fused_loss=1)
    monkeypatch.setattr(trl, "__version__", "1.15.2")
    with pytest.raises(ImportError, match=r"found trl 1\.15\.2"):
        rt.use_rlhf_fast()
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(ImportError, match="trl is not installed"):
        rt.use_rlhf_fast()


def test_adapter_repatches_and_falls_back(base):
    rt.use_rlhf_fast()
    model = copy.deepcopy(base)
    rt.add_fused_lm_head(model, temperature=0.5, outputs=("log_probs", "entropy"))
    rt.add_fused_lm_head(model, temperature=2.0)  # a second trainer on the same model: its settings win
    ids = torch.randint(3, 300, (2, 6))
    labels = ids.clone()
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    want = (model(input_ids=ids).logits[:, :-1].double() / 2.0).log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    assert rel_err(out.log_probs, want) < TOL and out.entropy is None and has_rlhf_fast_head(model)
    # a head rlhf_fast refuses (a Linear subclass with its own forward): TRL's own head, with a warning
    other = copy.deepcopy(base)
    other.lm_head.__class__ = type("ScaledHead", (torch.nn.Linear,), {"forward": lambda self, x: 2 * torch.nn.Linear.forward(self, x)})
    with pytest.warns(UserWarning, match="TRL's own fused LM head"):
        rt.add_fused_lm_head(other)
    assert not has_rlhf_fast_head(other) and other(input_ids=ids, labels=labels, fused_lm_head=True).log_probs.shape == (2, 5)


def test_cast_lm_head_to_fp32_under_autocast(base):
    """bf16 autocast on CPU: with cast_lm_head_to_fp32 both heads run the projection in fp32 on the same bf16
    backbone output, so they agree to fp32 accuracy; without it they would differ at bf16's 4e-3."""
    ids = torch.randint(3, 300, (2, 7))
    trl_model, ours = copy.deepcopy(base), copy.deepcopy(base)
    TRL_ADD(trl_model, temperature=0.7, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy"))
    rt.use_rlhf_fast()
    rt.add_fused_lm_head(ours, temperature=0.7, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = trl_model(input_ids=ids, labels=ids, fused_lm_head=True)
        b = ours(input_ids=ids, labels=ids, fused_lm_head=True)
    assert b.log_probs.dtype == torch.float32
    assert rel_err(b.log_probs, a.log_probs) < TOL and rel_err(b.entropy, a.entropy) < TOL


# ------------------------------------------------------------------ GRPO _compute_loss against a float64 reference
def ref_head(model, temperature):
    """``fused_lm_head=True`` from the model's own logits in float64 (the definition): log-probs and entropy."""
    plain = model.forward

    def forward(*args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:
            return plain(*args, labels=labels, **kwargs)
        kwargs.pop("output_router_logits", None)
        logits = plain(*args, **kwargs).logits[:, :-1].double() / temperature
        lsm = logits.log_softmax(-1)
        tgt = labels[:, 1:]
        valid = tgt != -100
        lp = lsm.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        ent = -(lsm.exp() * lsm).sum(-1)
        return types.SimpleNamespace(log_probs=torch.where(valid, lp, 0), entropy=torch.where(valid, ent, 0), label_mask=valid)

    model.forward = forward


def make_batch(seed, vocab, dtype):
    """4 completions of 7 slots, valid lengths 7, 4, 0 (empty), 2; row 1's 5-token prompt left-padded by 2;
    advantages < 0 on rows 0 and 1, > 0 on rows 2 and 3."""
    g = torch.Generator().manual_seed(seed)
    b, p, c = 4, 5, 7
    prompt_ids = torch.randint(3, vocab, (b, p), generator=g)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[1, :2] = 0
    completion_ids = torch.randint(3, vocab, (b, c), generator=g)
    completion_mask = (torch.arange(c) < torch.tensor([7, 4, 0, 2]).unsqueeze(1)).int()
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "advantages": torch.randn(b, generator=g, dtype=dtype).abs() * torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=dtype),
            "num_items_in_batch": torch.tensor(2.0 * completion_mask.sum().item(), dtype=dtype)}, g


def set_case(trainer, loss_type, level, beta, delta):
    trainer.loss_type, trainer.importance_sampling_level, trainer.beta = loss_type, level, beta
    trainer.args.delta, trainer.args.use_bias_correction_kl = delta, False
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train()


def compute(trainer, model, inputs):
    model.zero_grad()
    before = {k: len(v) for k, v in trainer._metrics["train"].items()}
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if len(v) > before.get(k, 0)}
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}, metrics


CASES = [  # (loss_type, importance_sampling_level, off-policy, beta, delta)
    ("dapo", "token", False, 0.0, None),
    ("grpo", "token", False, 0.1, None),
    ("bnpo", "sequence", False, 0.0, None),
    ("dr_grpo", "token", True, 0.0, None),
    ("dapo", "token", True, 0.1, 1.5),
    ("grpo", "token", True, 0.1, 1.5),
    ("grpo", "sequence", True, 0.1, None),
    ("bnpo", "token", True, 0.0, 1.5),
    ("dapo", "sequence", True, 0.0, 1.5),
    ("dr_grpo", "sequence", False, 0.1, None),
]


@pytest.fixture(scope="module")
def direct_trainers(base, tok, tmp_path_factory):
    """(float64 reference trainer, TRL fp32 trainer, rlhf_fast fp32 trainer), temperature 0.7, accumulation 2."""
    kw = {"temperature": 0.7, "gradient_accumulation_steps": 2, "epsilon_high": 0.28}
    ref = grpo_trainer(copy.deepcopy(base).double(), tok, tmp_path_factory.mktemp("r"), **kw)
    ref_head(ref.model, 0.7)
    trl32 = grpo_trainer(copy.deepcopy(base), tok, tmp_path_factory.mktemp("t"), **kw)
    with rt.rlhf_fast_trl():
        ours = grpo_trainer(copy.deepcopy(base), tok, tmp_path_factory.mktemp("o"), **kw)
    assert has_rlhf_fast_head(ours.model) and not has_rlhf_fast_head(trl32.model)
    return ref, trl32, ours


@pytest.mark.parametrize("loss_type,level,off_policy,beta,delta", CASES)
def test_fused_grpo_loss_matches_trl(direct_trainers, count_fused, loss_type, level, off_policy, beta, delta):
    ref, trl32, ours = direct_trainers
    inputs, g = make_batch(CASES.index((loss_type, level, off_policy, beta, delta)), ours.model.config.vocab_size, torch.float64)
    # old log-probs: the current float64 ones shifted per row (ratios ~1.8 with A < 0: dual clip; ~0.6 with
    # A < 0: low clip; ~1.6 with A > 0: high clip, token and sequence ratios alike) and by +-0.3 per token
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        lp = ref._get_per_token_logps_and_entropies(ref.model, ids, attn, ids.shape[1] - 5)[0]
    if off_policy:
        row = torch.tensor([[-0.6], [0.5], [0.0], [-0.5]], dtype=lp.dtype)
        inputs["old_per_token_logps"] = lp + row + (torch.rand(lp.shape, generator=g, dtype=lp.dtype) - 0.5) * 0.6
    if beta:
        inputs["ref_per_token_logps"] = lp + (torch.rand(lp.shape, generator=g, dtype=lp.dtype) - 0.5) * 2.0
    f32 = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    for t in (ref, trl32, ours):
        set_case(t, loss_type, level, beta, delta)
    want_loss, want_grads, want_metrics = compute(ref, ref.model, inputs)
    trl_loss, trl_grads, trl_metrics = compute(trl32, trl32.model, f32)
    with rt.rlhf_fast_trl(fused_loss=True), warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warns: this must not fall back
        n = len(count_fused)
        loss, grads, metrics = compute(ours, ours.model, f32)
        assert count_fused[n:] == [(off_policy, "ppo_clip")]  # on-policy: old_logprobs=None
    assert loss.dtype == torch.float32 and metrics.keys() == want_metrics.keys() == trl_metrics.keys()
    assert {"entropy", "clip_ratio/region_mean"} <= metrics.keys() and ("kl" in metrics) == (beta != 0)
    if off_policy:  # the perturbation makes ratios clip: the clipped branches are exercised
        assert want_metrics["clip_ratio/region_mean"] > 0
    if delta is not None:  # and some ratio of a negative-advantage token passes the dual clip
        mask = inputs["completion_mask"].bool()
        log_r = torch.where(mask, lp - inputs["old_per_token_logps"], 0)
        if level == "sequence":
            log_r = (log_r.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(log_r)
        assert (mask & (log_r.exp() > delta) & (inputs["advantages"].unsqueeze(1) < 0)).any()
    assert want_loss.abs() > 1e-3
    for got_loss, got_grads, got_metrics in ((loss, grads, metrics), (trl_loss, trl_grads, trl_metrics)):
        assert abs(got_loss.item() - want_loss.item()) < LOSS_ATOL
        for name, want in want_grads.items():
            assert rel_err(got_grads[name], want) < GTOL, name
        for k, want in want_metrics.items():
            assert abs(got_metrics[k] - want) <= TOL * max(1.0, abs(want)), k


def test_fused_loss_falls_back(direct_trainers, count_fused):
    _, trl32, ours = direct_trainers
    inputs, _ = make_batch(3, ours.model.config.vocab_size, torch.float32)
    for t in (trl32, ours):
        set_case(t, "dapo", "token", 0.1, None)
    inputs["ref_per_token_logps"] = torch.zeros(4, 7)
    with rt.rlhf_fast_trl(fused_loss=True):
        ours.args.use_bias_correction_kl = True
        assert "use_bias_correction_kl" in rt.grpo_fused_loss_unsupported(ours, inputs)
        with pytest.warns(UserWarning, match="TRL's own GRPO loss"):
            loss, grads, _ = compute(ours, ours.model, inputs)
        assert count_fused == []
        trl32.args.use_bias_correction_kl = True
        with pytest.warns(UserWarning, match="TRL's own GRPO loss"):  # patched class-wide: TRL's loss again
            want_loss, want_grads, _ = compute(trl32, trl32.model, inputs)
        assert rel_err(loss, want_loss) < TOL and all(rel_err(grads[n], w) < GTOL for n, w in want_grads.items())
        ours.args.use_bias_correction_kl = False
        ours.loss_type = "cispo"
        assert "loss_type='cispo'" in rt.grpo_fused_loss_unsupported(ours)
        ours.loss_type, ours.top_entropy_quantile = "dapo", 0.2
        assert "top_entropy_quantile" in rt.grpo_fused_loss_unsupported(ours)
        ours.top_entropy_quantile = 1.0
        ours.args.delta = 1.1  # <= 1 + epsilon_high
        assert "delta" in rt.grpo_fused_loss_unsupported(ours)
        ours.args.delta = None
        assert "tool masks" in rt.grpo_fused_loss_unsupported(ours, inputs | {"tool_mask": inputs["completion_mask"]})
        assert rt.grpo_fused_loss_unsupported(trl32) is not None  # TRL's own head
        assert rt.grpo_fused_loss_unsupported(ours, inputs) is None


# ------------------------------------------------------------------------------------------------ real trainings
def assert_same_history(got, want, keys, logp_scaled=None):
    """Same logged values within RUN_TOL, relative to max(1, |value|); ``logp_scaled`` {key: c}: relative to
    c * |logps/*| (sequence log-prob sums) as well, for keys computed from differences of such sums (rewards = beta
    * (logps - ref_logps), whose rounding follows the sums' magnitude, not the difference's)."""
    steps = [(a, b) for a, b in zip(got, want) if "loss" in b and "train_runtime" not in b]
    assert len(got) == len(want) and len(steps) >= 2
    for a, b in steps:
        logps = max(abs(b.get("logps/chosen", 0.0)), abs(b.get("logps/rejected", 0.0)))
        for k in keys:
            if k in b:
                mag = max(1.0, abs(b[k]), (logp_scaled or {}).get(k, 0.0) * logps)
                assert abs(a[k] - b[k]) <= RUN_TOL * mag, (k, a[k], b[k])


GRPO_KEYS = ("loss", "grad_norm", "entropy", "kl", "reward", "clip_ratio/low_mean", "clip_ratio/high_mean",
             "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max", "completions/mean_length")


def test_grpo_training_matches_trl(base, tok, tmp_path, count_fused):
    """Default GRPO (dapo, on-policy): TRL's head vs rlhf_fast's head vs rlhf_fast's fused loss, 3 steps."""
    want = grpo_trainer(copy.deepcopy(base), tok, tmp_path)
    want.train()
    for fused in (False, True):
        with rt.rlhf_fast_trl(fused_loss=fused):
            got = grpo_trainer(copy.deepcopy(base), tok, tmp_path)
            assert has_rlhf_fast_head(got.model)
            got.train()
        assert_same_history(got.state.log_history, want.state.log_history, GRPO_KEYS)
    assert len(count_fused) == 3  # one fused loss per step, fused run only
    assert all(h["grad_norm"] > 0.1 for h in want.state.log_history if "grad_norm" in h)


def test_grpo_training_off_policy_kl_matches_trl(base, tok, tmp_path, count_fused):
    """grpo loss, k3 KL to a reference model, two iterations per generation (stored old log-probs: the clipped
    path), clip-higher, dual clip, temperature 0.7: TRL vs rlhf_fast's fused loss."""
    over = {"loss_type": "grpo", "beta": 0.1, "use_bias_correction_kl": False, "num_iterations": 2, "epsilon_high": 0.28,
            "delta": 1.5, "temperature": 0.7}
    want = grpo_trainer(copy.deepcopy(base), tok, tmp_path, **over)
    want.train()
    with rt.rlhf_fast_trl(fused_loss=True):
        got = grpo_trainer(copy.deepcopy(base), tok, tmp_path, **over)
        got.train()
    assert has_rlhf_fast_head(got.ref_model) and count_fused.count((True, "ppo_clip")) >= 1
    assert_same_history(got.state.log_history, want.state.log_history, GRPO_KEYS)
    assert any(h.get("kl", 0) > 0 for h in want.state.log_history) and any(abs(h.get("loss", 0)) > 1e-4 for h in want.state.log_history)


def test_sft_training_matches_trl(base, tok, tmp_path):
    ds = Dataset.from_dict({"text": [p + " because it is so." for p in PROMPTS] * 2})
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, logging_steps=1, report_to=[],
                     use_cpu=True, bf16=False, seed=0, optim="sgd", learning_rate=0.5, save_strategy="no", disable_tqdm=True,
                     max_length=32)

    def run():
        t = SFTTrainer(model=copy.deepcopy(base), args=args, train_dataset=ds, processing_class=tok)
        t.train()
        return t

    want = run()
    with rt.rlhf_fast_trl():
        got = run()
    assert has_rlhf_fast_head(got.model)
    assert_same_history(got.state.log_history, want.state.log_history, ("loss", "grad_norm", "entropy", "mean_token_accuracy"))


# DPO, KTO and RLOO give the policy (and the reference model, when they hold one) a fused head unconditionally in
# TRL 1.16: no config flag turns it on or off (dpo_trainer.py:960, kto_trainer.py:967, rloo_trainer.py:716).
RUN_KW = {"max_steps": 3, "logging_steps": 1, "report_to": [], "use_cpu": True, "bf16": False, "seed": 0, "optim": "sgd",
          "save_strategy": "no", "disable_tqdm": True}


def run_both(make, keys, count_head, min_calls, logp_scaled=None):
    """``make()`` -> an untrained trainer; trains TRL's path then rlhf_fast's (same initial model) and compares
    their log histories. Returns TRL's trainer."""
    want = make()
    assert not has_rlhf_fast_head(want.model)
    want.train()
    assert count_head == []  # TRL's own head never reaches rlhf_fast's ops
    with rt.rlhf_fast_trl():
        got = make()
    assert has_rlhf_fast_head(got.model)
    ref = getattr(got, "ref_model", None)
    assert ref is None or has_rlhf_fast_head(ref)
    got.train()
    assert len(count_head) >= min_calls
    assert_same_history(got.state.log_history, want.state.log_history, keys, logp_scaled)
    assert all(h["grad_norm"] > 1e-3 for h in want.state.log_history if "grad_norm" in h)  # the steps move the model
    return want


DPO_KEYS = ("loss", "grad_norm", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "rewards/chosen",
            "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def test_dpo_training_matches_trl(base, tok, tmp_path, count_head):
    """DPO with WPO weighting (use_weighting: the log_sum_sq_probs output) and a reference model loaded by TRL:
    every head output DPO reads (log_probs, entropy, mean_logits, is_top1, log_sum_sq_probs) feeds a logged key."""
    ds = Dataset.from_dict({"prompt": PROMPTS * 2, "chosen": [" a red apple.", " water from clouds.", " a pear.", " light."] * 2,
                            "rejected": [" no.", " I do not know why.", " stone", " because."] * 2})
    beta = 0.5
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=2.0, beta=beta,
                     use_weighting=True, max_length=32, **RUN_KW)
    want = run_both(lambda: DPOTrainer(model=copy.deepcopy(base), args=args, train_dataset=ds, processing_class=tok),
                    DPO_KEYS, count_head, 3 * 2,  # policy + reference per step
                    {k: beta for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins")})
    assert want.ref_model is not None and not has_rlhf_fast_head(want.ref_model)
    assert any(abs(h.get("rewards/margins", 0)) > 1e-3 for h in want.state.log_history)  # the policy left the reference


KTO_KEYS = ("loss", "grad_norm", "kl", "entropy", "logits/chosen", "logits/rejected", "rewards/chosen", "rewards/rejected",
            "rewards/margins", "logps/chosen", "logps/rejected")


def test_kto_training_matches_trl(base, tok, tmp_path, count_head):
    """KTO (loss_type "kto": the KL term from mismatched completions, through the policy's and the reference's head)."""
    ds = Dataset.from_dict({"prompt": PROMPTS * 3, "completion": [" a red apple.", " no.", " a pear.", " stone"] * 3,
                            "label": [True, False, True, False] * 3})
    beta = 0.5
    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=2.0, beta=beta, max_length=32,
                     **RUN_KW)
    want = run_both(lambda: KTOTrainer(model=copy.deepcopy(base), args=args, train_dataset=ds, processing_class=tok),
                    KTO_KEYS, count_head, 3 * 4,  # policy and reference, each on completions and KL completions
                    {"kl": 1.0} | {k: beta for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins")})
    assert want.calculate_KL and any(h.get("kl", 0) > 0 for h in want.state.log_history)


RLOO_KEYS = ("loss", "grad_norm", "entropy", "kl", "reward", "reward_std", "clip_ratio/region_mean",
             "completions/mean_length")


def test_rloo_training_matches_trl(base, tok, tmp_path, count_head):
    """RLOO (beta 0.05: the k1 KL to a reference model, loaded by TRL, in the reward), temperature 0.7, two
    iterations per generation (stored old log-probs, so the ratio is not 1 on the second)."""
    args = RLOOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
                      learning_rate=0.003, temperature=0.7, num_iterations=2, **RUN_KW)
    ds = Dataset.from_dict({"prompt": PROMPTS * 4})
    want = run_both(lambda: RLOOTrainer(model=copy.deepcopy(base), reward_funcs=reward, args=args, train_dataset=ds,
                                        processing_class=tok),
                    RLOO_KEYS, count_head, 3)
    assert want.beta > 0 and any(abs(h.get("kl", 0)) > 1e-4 for h in want.state.log_history)  # k1: either sign
    # the second pass over a generation (no "reward" logged) runs on moved weights: ratio != 1, nonzero loss
    assert any("reward" not in h and abs(h.get("loss", 0)) > 1e-3 for h in want.state.log_history)

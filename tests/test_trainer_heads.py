"""The trainers score the distribution the model itself defines: its LM head read through
``integrations.hf.lm_head_params`` (a LoRA adapter on lm_head folded in) with its logit transform (Gemma-2's
final_logit_softcapping, Cohere's logit_scale).

Every reference is the model's own forward: ``model(...).logits.double()`` (its forward applies its softcap / scale,
and peft's LoRA head), divided by the temperature, log-softmaxed and gathered at the labels. Tiny random models
(hidden 32, 2 layers, vocab 384, init range 0.5 so logits are O(3) and a cap of 2 or a scale of 0.5 change them a
lot) on the tiny BPE tokenizer of ppo_tiny.
"""
import copy
import json
import math
import random

import pytest
import torch
from ppo_tiny import grouped_rollout, make_tokenizer, tiny_config

from rlhf_fast.errors import UserError
from rlhf_fast.models import unwrap
from rlhf_fast.trainers import ppo as ppo_module
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
from rlhf_fast.trainers.ppo import RLTrainer
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer
from rlhf_fast.trainers.stage import IGNORE_INDEX, batch_tensors, load_stage_config

tf = pytest.importorskip("transformers")

TEMP = 0.8
# measured fp32 error of the trainers' log-probs vs the float64 forward: <= 2.5e-6 (fused and eager)
TOL = 1e-5
GROUPED = {"generation.n": 2, "ppo.batch_size": 4, "algorithm.adv_estimator": "grpo"}
WORDS = "good bad happy sad door window cat dog sun rain tea bike park".split()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    tok = make_tokenizer(root / "tokenizer")
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.5, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    configs = {
        "gemma2": tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0),  # tied, 2 tanh(z / 2)
        "cohere": tf.CohereConfig(**common, logit_scale=0.5),  # tied, z * 0.5
        "llama": tf.LlamaConfig(**common, tie_word_embeddings=False),  # for LoRA on lm_head
    }
    out = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    rng = random.Random(0)
    sft = [{"prompt": f"Say something about the {rng.choice(WORDS)}.", "response": " ".join(rng.choices(WORDS, k=rng.randint(2, 9)))}
           for _ in range(12)]
    pairs = [{"prompt": f"Tell me about the {rng.choice(WORDS)} {i}.", "chosen": " ".join(rng.choices(WORDS, k=3)),
              "rejected": " ".join(rng.choices(WORDS, k=5))} for i in range(12)]
    for name, rows in (("sft", sft), ("pairs", pairs)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[name] = str(root / f"{name}.jsonl")
    return out


def own_log_softmax(model, input_ids, attention_mask, start: int, temperature: float = 1.0):
    """float64 log_softmax of the model's own logits / temperature at columns start.. -1 (those predicting the next
    token); each row run alone on its attended tokens only (no padding, wherever the rollout put it: positions from 0,
    as in an unpadded forward). Columns that are not attended get zero logits (never compared)."""
    rows = []
    for ids, mask in zip(input_ids, attention_mask):
        keep = mask.bool()
        with torch.no_grad():
            logits = model(input_ids=ids[keep][None]).logits[0]
        full = logits.new_zeros(len(ids), logits.shape[-1])
        full[keep] = logits
        rows.append(full[start:-1])
    return (torch.stack(rows).double() / temperature).log_softmax(-1)


def gather(lsm, labels):
    return lsm.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def assert_on_mask(got, want, mask, tol=TOL):
    assert mask.any()
    err = (got.double() - want)[mask].abs().max().item()
    assert err < tol, err


# ----------------------------------------------------------------------------------------------- RL


def rl_trainer(path, out, **over):
    return RLTrainer(tiny_config(path, out, **{"model.attn_implementation": "eager", "generation.temperature": TEMP,
                                               "ppo.iterations": 1, **GROUPED, **over}))


def update(trainer, ro) -> dict:
    scores = torch.linspace(-1, 1, len(ro))
    kept, _ = trainer.filter_groups(ro, scores)
    trainer.advantages(kept, scores)
    return trainer.update(kept)


def check_scores(trainer, ro, policy, ref):
    lsm = own_log_softmax(policy, ro.input_ids, ro.attention_mask, ro.prompt_len - 1, TEMP)
    ref_lsm = own_log_softmax(ref, ro.input_ids, ro.attention_mask, ro.prompt_len - 1, TEMP)
    mask = ro.response_mask
    assert_on_mask(ro.logprobs, gather(lsm, ro.labels), mask)
    assert_on_mask(ro.ref_logprobs, gather(ref_lsm, ro.labels), mask)
    assert_on_mask(ro.kl, (lsm.exp() * (lsm - ref_lsm)).sum(-1), mask)  # ppo.kl_estimator: full


@pytest.mark.parametrize("kernels", ["fused", "eager"])
@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_rl_scores_the_models_own_distribution(paths, tmp_path, family, kernels):
    trainer = rl_trainer(paths[family], tmp_path / "run", kernels=kernels, **{"ppo.kl_estimator": "full"})
    ro = grouped_rollout(trainer, 2)
    check_scores(trainer, ro, trainer.policy, trainer.ref)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    metrics = update(trainer, ro)
    assert math.isfinite(metrics["loss/policy"]) and math.isfinite(metrics["grad_norm"])
    assert any(not torch.equal(before[n], p) for n, p in trainer.policy.named_parameters()), "no weight changed"
    # the policy moved, the reference did not: each log-prob (and the exact KL between them) from its own model
    ro = grouped_rollout(trainer, 2)
    check_scores(trainer, ro, trainer.policy, trainer.ref)
    assert (ro.logprobs - ro.ref_logprobs)[ro.response_mask].abs().max() > 1e-4


LORA_HEAD = {"model.lora.enabled": True, "model.lora.r": 4, "model.lora.alpha": 8,
             "model.lora.target_modules": ["q_proj", "v_proj", "lm_head"]}


@pytest.mark.parametrize("kernels", ["fused", "eager"])
def test_rl_lora_on_lm_head_is_in_the_logprobs(paths, tmp_path, kernels):
    trainer = rl_trainer(paths["llama"], tmp_path / "run", kernels=kernels, **LORA_HEAD)
    head = unwrap(trainer.policy).lm_head
    with torch.no_grad():  # B starts at 0 (a no-op adapter): make the head's adapter matter
        head.lora_B["default"].weight.normal_(0, 0.3)
    ro = grouped_rollout(trainer, 2)
    with trainer.policy.disable_adapter():
        ref_lsm = own_log_softmax(trainer.policy, ro.input_ids, ro.attention_mask, ro.prompt_len - 1, TEMP)
    lsm = own_log_softmax(trainer.policy, ro.input_ids, ro.attention_mask, ro.prompt_len - 1, TEMP)
    assert_on_mask(ro.logprobs, gather(lsm, ro.labels), ro.response_mask)
    assert_on_mask(ro.ref_logprobs, gather(ref_lsm, ro.labels), ro.response_mask)
    assert (ro.logprobs - ro.ref_logprobs)[ro.response_mask].abs().max() > 1e-2
    b_before = head.lora_B["default"].weight.detach().clone()
    update(trainer, ro)
    assert not torch.equal(head.lora_B["default"].weight, b_before), "the head's adapter got no gradient"


def test_rl_refuses_lora_dropout_on_the_head(paths, tmp_path):
    with pytest.raises(UserError, match="model.policy: .*dropout"):
        rl_trainer(paths["llama"], tmp_path / "run", **LORA_HEAD, **{"model.lora.dropout": 0.1})


TRPO = {"algorithm.policy_update": "trpo", "algorithm.max_kl": 0.02, "algorithm.cg_iters": 3}


def test_trpo_refuses_what_its_fisher_products_do_not_model(paths, tmp_path):
    with pytest.raises(UserError, match="softcap=2.0"):
        rl_trainer(paths["gemma2"], tmp_path / "a", **TRPO)
    with pytest.raises(UserError, match="LoRA on lm_head"):
        rl_trainer(paths["llama"], tmp_path / "b", **TRPO, **LORA_HEAD)


def test_trpo_fisher_product_under_a_logit_scale(paths, tmp_path, monkeypatch):
    """v^T F v of the trainer's Fisher product = mean over response tokens of Var_p[dz] (z: the model's own
    logits / T, dz their derivative along v by central differences on a float64 copy), at theta_old."""
    # the top layer trains (the tied embedding / head is frozen: autograd gives its padding_idx row no gradient,
    # while the token is in the prompts, so a Fisher over it would not be the KL's Hessian)
    trainer = rl_trainer(paths["cohere"], tmp_path / "run", **TRPO, **{"algorithm.cg_damping": 0.0, "model.trainable_layers": 1})
    seen = {}
    make_fvp, trpo_update = ppo_module.make_fvp, trainer.trpo_update

    def spy(params, hidden_fn, weight, mask, **kw):
        fvp = make_fvp(params, hidden_fn, weight, mask, **kw)
        v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
        seen.update(vfv=float(v @ fvp(v)), v=v, model=copy.deepcopy(unwrap(trainer.policy)).double())
        return fvp

    monkeypatch.setattr(ppo_module, "make_fvp", spy)
    trainer.trpo_update = lambda ro: seen.setdefault("ro", ro) and trpo_update(ro)
    assert trainer.train()["status"] == "completed"
    ro, model, v = seen["ro"], seen["model"], seen["v"].double()
    params = [p for p in model.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in params]

    def z(eps):
        with torch.no_grad():
            offset = 0
            for p, t in zip(params, theta):
                p.copy_(t + eps * v[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
        return own_log_softmax(model, ro.input_ids, ro.attention_mask, ro.prompt_len - 1, TEMP)

    eps = 1e-3  # Cohere's layer norms compute in fp32 even in a float64 model: a smaller step meets that rounding
    lsm = z(0.0)
    # log_softmax differs from z / T by a per-token constant, which the variance under p does not see
    dz = (z(eps) - z(-eps)) / (2 * eps)
    p = lsm.exp()
    var = (p * dz**2).sum(-1) - (p * dz).sum(-1) ** 2
    want = var[ro.response_mask].mean().item()
    assert seen["vfv"] == pytest.approx(want, rel=2e-4)  # measured 3e-5


# ----------------------------------------------------------------------------------------------- SFT, DPO


def stage_base(path, out, **over):
    return {"model.policy": path, "output_dir": str(out), "threads": 1, "progress_bar": False, "train.batch_size": 4,
            "train.micro_batch_size": 4, "train.lr": 1e-3, "save_final_model": False, "model.attn_implementation": "eager"} | over


@pytest.mark.parametrize("kernels", ["fused", "eager"])
@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_sft_token_logprobs_are_the_models_own(paths, tmp_path, family, kernels):
    trainer = SFTTrainer(load_stage_config(SFTConfig, None, stage_base(paths[family], tmp_path / "sft", kernels=kernels,
                                                                       **{"data.train_file": paths["sft"]})))
    examples = trainer.train_set[:4]
    lp, target = trainer.token_logprobs(examples)
    ids, mask, labels = batch_tensors([e.ids for e in examples], [e.labels for e in examples], trainer.tokenizer.pad_token_id,
                                      trainer.device)
    want = gather(own_log_softmax(trainer.model, ids, mask, 0), labels[:, 1:])
    assert torch.equal(target, labels[:, 1:] != IGNORE_INDEX)
    assert_on_mask(lp, want, target)


@pytest.mark.parametrize("family,reference", [("gemma2", None), ("cohere", "gemma2")])
def test_dpo_sequence_logprobs_are_the_models_own(paths, tmp_path, family, reference):
    over = {"data.train_file": paths["pairs"], "train.max_steps": 1}
    if reference:
        over["dpo.reference_model"] = paths[reference]
    trainer = DPOTrainer(load_stage_config(DPOConfig, None, stage_base(paths[family], tmp_path / "dpo", **over)))
    ref_model = tf.AutoModelForCausalLM.from_pretrained(paths[reference or family], attn_implementation="eager").eval()
    pairs = trainer.train_set[:3]
    chosen, rejected = trainer.sequence_logprobs(pairs)

    def seq(model, ids, labels):
        ids, labels = torch.tensor([ids]), torch.tensor([labels])
        lp = gather(own_log_softmax(model, ids, torch.ones_like(ids), 0), labels[:, 1:])
        return lp[labels[:, 1:] != IGNORE_INDEX].sum().item()

    for i, p in enumerate(pairs):
        assert chosen[i].item() == pytest.approx(seq(trainer.model, p.chosen_ids, p.chosen_labels), abs=1e-4)
        assert rejected[i].item() == pytest.approx(seq(trainer.model, p.rejected_ids, p.rejected_labels), abs=1e-4)
        # the cached reference log-probs: the reference model's own (its class, its transform)
        assert p.ref_chosen == pytest.approx(seq(ref_model, p.chosen_ids, p.chosen_labels), abs=1e-4)
        assert p.ref_rejected == pytest.approx(seq(ref_model, p.rejected_ids, p.rejected_labels), abs=1e-4)

"""rlhf_fast.integrations.hf.add_fused_lm_head against the unpatched transformers model.

Every reference is the model's own ``logits`` (its forward applies its softcap / scale), taken to float64 and
turned into log-probs / entropy / KL / diagnostics from their definitions; gradients of the same objective are
compared over all parameters. Tiny random models (hidden 32, one layer, vocab 128) with a large init range, so
logits are O(3) and a softcap or scale visibly changes the distribution.
"""
import pytest
import torch
from conftest import rel_err
from torch import nn

tf = pytest.importorskip("transformers")
from rlhf_fast.integrations import hf
from rlhf_fast.integrations.hf import add_fused_lm_head

V, T = 128, 10
TEMP = 0.7
# measured fp32 error of the fused path vs the float64 reference: values <= 1.2e-6 (mean_logits, near 0), others
# <= 4e-7; gradients <= 2e-6
TOL, GTOL = 5e-6, 1e-5

_COMMON = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 64, "initializer_range": 0.5, "bos_token_id": 1,
           "eos_token_id": 2, "pad_token_id": 0}
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_COMMON),
    "qwen2": lambda: tf.Qwen2Config(**_COMMON),
    "qwen3": lambda: tf.Qwen3Config(**_COMMON, head_dim=8),
    "mistral": lambda: tf.MistralConfig(**_COMMON),
    "gemma2": lambda: tf.Gemma2Config(**_COMMON, head_dim=8, final_logit_softcapping=3.0),  # tied, softcap
    "cohere": lambda: tf.CohereConfig(**_COMMON, logit_scale=0.3),  # tied, logits * 0.3
    "granite": lambda: tf.GraniteConfig(**_COMMON, logits_scaling=4.0),  # logits / 4
    "phi3": lambda: tf.Phi3Config(**_COMMON),
    "gpt2": lambda: tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=64, initializer_range=0.5,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0),  # tied
}


def make_model(family, seed=0, config=None):
    torch.manual_seed(seed)
    cfg = config or CONFIGS[family]()
    cfg._attn_implementation = "eager"
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def make_batch(seed=0):
    """input_ids [2, T]; row 1 right-padded by 2; labels -100 on a 3-token prompt, the padding and one hole."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, T), generator=g)
    attn = torch.ones(2, T, dtype=torch.long)
    attn[1, -2:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[attn == 0] = -100
    labels[0, 6] = -100
    return ids, attn, labels


def ref_logp(logits, labels, temperature):
    """float64 (log_probs, entropy, log_softmax, valid) of the shifted labels under softmax(logits / T)."""
    lsm = (logits[:, :-1].double() / temperature).log_softmax(-1)
    tgt = labels[:, 1:]
    valid = tgt != -100
    lp = lsm.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return torch.where(valid, lp, 0), torch.where(valid, ent, 0), lsm, valid


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_match(got, want):
    assert got.keys() == want.keys() and got
    for n in want:
        assert rel_err(got[n], want[n]) < GTOL, n


@pytest.mark.parametrize("family", list(CONFIGS))
def test_family_logprobs_entropy_and_grads(family):
    model = make_model(family)
    ids, attn, labels = make_batch()
    # reference: the unpatched model's logits; gradient of -sum(log_probs) - 0.5 sum(entropy) through them
    logits = model(ids, attention_mask=attn).logits
    ref_lp, ref_ent, _, valid = ref_logp(logits, labels, TEMP)
    (-ref_lp.sum() - 0.5 * ref_ent.sum()).backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)

    if family == "gemma2":  # the softcap bites: the logits differ from the raw head output
        raw = model.model(ids, attention_mask=attn).last_hidden_state @ model.lm_head.weight.T
        assert (raw - logits).abs().max() > 0.3
    assert hf.logit_transform(model) == {"gemma2": (1.0, 3.0), "cohere": (0.3, None), "granite": (0.25, None)}.get(family, (1.0, None))

    add_fused_lm_head(model, temperature=TEMP, outputs=("log_probs", "entropy"))
    out = model(ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    assert out.log_probs.shape == out.entropy.shape == out.label_mask.shape == (2, T - 1)
    assert out.log_probs.dtype == torch.float32 and out.kl is None and out.is_top1 is None
    assert torch.equal(out.label_mask, valid)
    assert rel_err(out.log_probs, ref_lp) < TOL
    assert rel_err(out.entropy, ref_ent) < TOL
    assert (out.log_probs[~valid] == 0).all() and (out.entropy[~valid] == 0).all()
    assert rel_err(out.loss, -ref_lp.sum() / valid.sum()) < TOL
    (-out.log_probs.sum() - 0.5 * out.entropy.sum()).backward()
    assert_grads_match(grads(model), want)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_unflagged_forward_and_generate_unchanged(family):
    model = make_model(family)
    ids, attn, labels = make_batch()
    prompt = ids[:, :4]
    before = model(ids, attention_mask=attn, labels=labels)
    gen_before = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    add_fused_lm_head(model)
    after = model(ids, attention_mask=attn, labels=labels)
    gen_after = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.loss, after.loss)
    assert torch.equal(gen_before, gen_after) and gen_after.shape == (2, 8)
    # at temperature 1 the fused loss is the model's own causal-LM loss (same shift, same -100 handling)
    fused = model(ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    assert rel_err(fused.loss, before.loss) < TOL


def test_positional_args_shift_labels_and_num_items():
    model = make_model("llama")
    ids, attn, labels = make_batch()
    add_fused_lm_head(model, temperature=TEMP)
    out = model(ids, attn, labels=labels, fused_lm_head=True)  # attention_mask passed positionally
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
    pre = model(input_ids=ids, attention_mask=attn, shift_labels=shifted, fused_lm_head=True)
    assert pre.log_probs.shape == (2, T)
    assert torch.equal(pre.log_probs[:, :-1], out.log_probs) and (pre.log_probs[:, -1] == 0).all()
    n = model(ids, attention_mask=attn, labels=labels, num_items_in_batch=5, fused_lm_head=True)
    assert rel_err(n.loss, -out.log_probs.sum() / 5) < TOL
    # no valid label at all: zeros, loss 0, and backward still runs
    none = model(ids, attention_mask=attn, labels=torch.full_like(labels, -100), fused_lm_head=True)
    assert (none.log_probs == 0).all() and none.loss.item() == 0
    none.loss.backward()


def test_bias_head():
    """A head with a bias (swapped in; transformers' forward calls it, so the reference includes it)."""
    model = make_model("llama")
    head = nn.Linear(32, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_(0, 1.0)
    model.lm_head = head
    ids, attn, labels = make_batch()
    ref_lp, _, _, _ = ref_logp(model(ids, attention_mask=attn).logits, labels, TEMP)
    (-ref_lp.sum()).backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    add_fused_lm_head(model, temperature=TEMP)
    out = model(ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    assert rel_err(out.log_probs, ref_lp) < TOL
    (-out.log_probs.sum()).backward()
    assert_grads_match(grads(model), want)
    assert "lm_head.bias" in want


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite"])
def test_kl_exact_against_float64(family):
    policy, ref = make_model(family, seed=0), make_model(family, seed=1)
    ids, attn, labels = make_batch()
    lp_logits = policy(ids, attention_mask=attn).logits
    with torch.no_grad():
        rf_logits = ref(ids, attention_mask=attn).logits
    _, _, lsm_p, valid = ref_logp(lp_logits, labels, TEMP)
    _, _, lsm_r, _ = ref_logp(rf_logits, labels, TEMP)
    ref_kl = torch.where(valid, (lsm_p.exp() * (lsm_p - lsm_r)).sum(-1), 0)
    ref_kl.sum().backward()
    want = grads(policy)
    policy.zero_grad(set_to_none=True)
    add_fused_lm_head(policy, temperature=TEMP, outputs=("kl",), ref_model=ref)
    out = policy(ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    assert out.kl.shape == (2, T - 1) and (out.kl[~valid] == 0).all() and ref_kl[valid].min() > 1e-3
    assert rel_err(out.kl, ref_kl) < TOL
    out.kl.sum().backward()
    assert_grads_match(grads(policy), want)
    assert all(p.grad is None for p in ref.parameters())


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_diagnostics_against_float64(family):
    model = make_model(family)
    ids, attn, labels = make_batch()
    logits = model(ids, attention_mask=attn).logits
    z = logits[:, :-1].double() / TEMP
    labels[0, 5] = int(z[0, 4].argmax())  # make some labels the argmax, so is_top1 is not all False
    labels[1, 3] = int(z[1, 2].argmax())
    _, _, lsm, valid = ref_logp(logits, labels, TEMP)
    tgt = labels[:, 1:]
    want_sq = torch.where(valid, (2 * lsm).exp().sum(-1).log(), 0)  # log sum_v p_v^2 from its definition
    want_mean = torch.where(valid, z.mean(-1), 0)
    want_top1 = valid & (z.argmax(-1) == tgt)
    assert want_top1.sum() >= 2 and (valid & ~want_top1).any()
    add_fused_lm_head(model, temperature=TEMP, outputs=("log_sum_sq_probs", "mean_logits", "is_top1"))
    out = model(ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    assert out.entropy is None and out.is_top1.dtype == torch.bool
    assert rel_err(out.log_sum_sq_probs, want_sq) < TOL
    assert rel_err(out.mean_logits, want_mean) < TOL
    assert torch.equal(out.is_top1, want_top1)
    assert not out.log_sum_sq_probs.requires_grad and out.log_probs.requires_grad


# --- PEFT ---------------------------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def _lora(targets, **kw):
    # init_lora_weights=False: B is random too, so the adapters change the output and get gradients through A
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM", **kw)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "v_proj", "lm_head"]], ids=["qv", "qv+lm_head"])
@pytest.mark.parametrize("order", ["patch-then-wrap", "wrap-then-patch"])
def test_peft_lora(targets, order):
    base = make_model("llama")
    if order == "patch-then-wrap":
        add_fused_lm_head(base, temperature=TEMP)
        model = peft.get_peft_model(base, _lora(targets))
    else:
        model = add_fused_lm_head(peft.get_peft_model(base, _lora(targets)), temperature=TEMP)
    if "lm_head" in targets:
        assert type(model.get_base_model().lm_head).__name__ == "Linear" and hasattr(model.get_base_model().lm_head, "lora_A")
    ids, attn, labels = make_batch()
    ref_lp, _, _, _ = ref_logp(model(input_ids=ids, attention_mask=attn).logits, labels, TEMP)
    (-ref_lp.sum()).backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    assert all("lora_" in n for n in want)
    assert any("lm_head" in n for n in want) == ("lm_head" in targets)
    out = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    assert rel_err(out.log_probs, ref_lp) < TOL
    (-out.log_probs.sum()).backward()
    assert_grads_match(grads(model), want)
    # the adapters matter: with them disabled the log-probs change (and the fused head follows)
    with model.disable_adapter():
        off = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
        off_ref, _, _, _ = ref_logp(model(input_ids=ids, attention_mask=attn).logits, labels, TEMP)
    assert rel_err(off.log_probs, off_ref) < TOL and rel_err(off.log_probs, out.log_probs) > 1e-2


def test_peft_modules_to_save_head():
    model = peft.get_peft_model(make_model("llama"), _lora(["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():  # the trained copy differs from the original head
        model.get_base_model().lm_head.modules_to_save["default"].weight.mul_(1.5)
    add_fused_lm_head(model, temperature=TEMP)
    ids, attn, labels = make_batch()
    ref_lp, _, _, _ = ref_logp(model(input_ids=ids, attention_mask=attn).logits, labels, TEMP)
    out = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    assert rel_err(out.log_probs, ref_lp) < TOL


def test_peft_head_adapters_that_cannot_fold_raise():
    dora = peft.get_peft_model(make_model("llama"), _lora(["lm_head"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        add_fused_lm_head(dora)
    drop = add_fused_lm_head(peft.get_peft_model(make_model("llama"), _lora(["lm_head"], lora_dropout=0.1)))
    ids, attn, labels = make_batch()
    drop.eval()  # dropout inactive: folds
    drop(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    drop.train()
    with pytest.raises(ValueError, match="dropout"):
        drop(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)


# --- what is refused ----------------------------------------------------------------------------------------------

class CustomLM(tf.LlamaForCausalLM):
    """A subclass outside transformers: its forward could do anything with config attributes."""


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_unsupported_heads_and_configs_raise():
    model = make_model("llama")
    model.lm_head = nn.Sequential(nn.Linear(32, V, bias=False))
    with pytest.raises(ValueError, match="not a torch.nn.Linear"):
        add_fused_lm_head(model)
    model.lm_head = ScaledLinear(32, V, bias=False)
    with pytest.raises(ValueError, match="ScaledLinear"):
        add_fused_lm_head(model)

    cfg = tf.LlamaConfig(**_COMMON)
    cfg.final_logit_softcapping = 5.0
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        add_fused_lm_head(CustomLM(cfg))
    cfg.final_logit_softcapping, cfg.output_multiplier = None, 1.0  # neutral values pass
    add_fused_lm_head(CustomLM(cfg))

    # a head swapped for an unsupported one after patching is caught at call time
    model = add_fused_lm_head(make_model("llama"))
    ids, attn, labels = make_batch()
    model.lm_head = ScaledLinear(32, V, bias=False)
    with pytest.raises(ValueError, match="ScaledLinear"):
        model(ids, attention_mask=attn, labels=labels, fused_lm_head=True)


def test_bad_arguments_raise():
    model = make_model("llama")
    for kw, match in [({"outputs": ("log_probs", "logits")}, "unknown output 'logits'"), ({"outputs": ("kl",)}, "ref_model"),
                      ({"ref_model": make_model("llama")}, "ref_model"), ({"temperature": 0.0}, "temperature"),
                      ({"backend": "cuda"}, "backend")]:
        with pytest.raises(ValueError, match=match):
            add_fused_lm_head(model, **kw)
    with pytest.raises(ValueError, match="ref_model: logit transform"):
        add_fused_lm_head(make_model("granite"), outputs=("kl",), ref_model=make_model("granite", config=tf.GraniteConfig(**_COMMON, logits_scaling=2.0)))
    add_fused_lm_head(model)
    with pytest.raises(ValueError, match="already"):
        add_fused_lm_head(model)
    ids, attn, labels = make_batch()
    with pytest.raises(ValueError, match="labels"):
        model(ids, attention_mask=attn, fused_lm_head=True)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, attention_mask=attn, labels=labels, logits_to_keep=1, fused_lm_head=True)
    with pytest.raises(TypeError, match="model"):
        add_fused_lm_head(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="outputs"):
        add_fused_lm_head(make_model("llama"), outputs="entropy")
    kl_model = add_fused_lm_head(make_model("llama"), outputs=("kl",), ref_model=make_model("llama", seed=1))
    with pytest.raises(ValueError, match="inputs_embeds"):
        kl_model(inputs_embeds=kl_model.get_input_embeddings()(ids), labels=labels, fused_lm_head=True)

"""SFT and DPO on a tiny random-weight Llama: the DPO/IPO losses by hand, DPO starting at log 2 with the policy
as its own reference and its reference log-probs cached once, SFT's response-only loss through the fused
log-probs (equal to the full-logits loss), packing that changes nothing but the layout, and exact resume."""
import json
import math
import os
import signal

import pytest
import torch
from ppo_tiny import make_stage_data, make_tiny_models

from rlhf_fast.ops import reference
from rlhf_fast.tracking import read_metrics
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer, dpo_loss
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer
from rlhf_fast.trainers.stage import IGNORE_INDEX, encode_conversation, load_stage_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_stage_data(tmp_path_factory.mktemp("data"))


def base(tiny, out, **over):
    return {"model.policy": tiny["policy"], "output_dir": str(out), "threads": 1, "progress_bar": False, "train.batch_size": 8,
            "train.micro_batch_size": 4, "train.lr": 1e-3, "save_final_model": False} | over


# ----------------------------------------------------------------------------------------------- DPO


def test_dpo_and_ipo_losses_by_hand():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -2.0])
    h = torch.tensor([(-10 + 11) - (-12 + 11.5), (-4 + 4.5) - (-3 + 2)])  # [1.5, 1.5]
    loss, c, r = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.15)), rel=1e-6)
    torch.testing.assert_close(c, 0.1 * (pc - rc))
    torch.testing.assert_close(r, 0.1 * (pr - rr))
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")
    assert ipo.item() == pytest.approx(float(((h - 2.0) ** 2).mean()), rel=1e-6)
    same = torch.tensor([-3.0, -7.0])
    assert dpo_loss(same, same, same, same, beta=0.5)[0].item() == pytest.approx(math.log(2), rel=1e-7)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, 0.1, "hinge")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, 0.0)


def test_dpo_starts_at_log2_and_learns(tiny, data, tmp_path):
    cfg = load_stage_config(DPOConfig, None, base(tiny, tmp_path / "dpo", **{"data.train_file": data["pairs"], "train.epochs": 4,
                                                                            "data.eval_fraction": 0.25, "dpo.beta": 0.5}))
    trainer = DPOTrainer(cfg)
    first, _ = trainer.compute_loss(trainer.train_set[:8])
    assert first.item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    trainer.train()
    rows = read_metrics(tmp_path / "dpo")
    assert rows[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[0]["eval/rewards/margin"] == pytest.approx(0, abs=1e-4)
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"] - 0.05
    assert rows[-1]["eval/rewards/accuracy"] > 0.5 and rows[-1]["rewards/chosen"] > rows[-1]["rewards/rejected"]


def test_dpo_reference_logprobs_are_cached_once(tiny, data, tmp_path, monkeypatch):
    over = base(tiny, tmp_path / "dpo", **{"data.train_file": data["pairs"], "train.max_steps": 2, "dpo.loss_type": "ipo"})
    trainer = DPOTrainer(load_stage_config(DPOConfig, None, over))
    cache = torch.load(tmp_path / "dpo" / "reference_logprobs.pt", weights_only=True)
    assert cache["train"].shape == (len(trainer.train_set), 2)
    # they are the initial policy's sequence log-probs, recomputed here through the full-logits reference op
    p = trainer.train_set[0]
    from rlhf_fast.models import backbone, hidden_states, lm_head

    ids = torch.tensor([p.chosen_ids])
    h = hidden_states(backbone(trainer.model), ids, torch.ones_like(ids))
    lp = reference.linear_logprobs(h[:, :-1].double(), lm_head(trainer.model)[0].double(), torch.tensor([p.chosen_labels])[:, 1:])
    assert cache["train"][0, 0].item() == pytest.approx(lp.sum().item(), rel=1e-5)
    trainer.train()  # training does not touch them
    assert torch.equal(torch.load(tmp_path / "dpo" / "reference_logprobs.pt", weights_only=True)["train"], cache["train"])
    # a resumed run reads the cache instead of recomputing (the trained policy would give other numbers)
    calls = []
    monkeypatch.setattr(DPOTrainer, "sequence_logprobs", lambda self, *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    resumed = DPOTrainer(load_stage_config(DPOConfig, None, over | {"train.max_steps": 3}), resume=tmp_path / "dpo")
    assert not calls and resumed.train_set[0].ref_chosen == pytest.approx(cache["train"][0, 0].item())


def test_dpo_rejects_ranked_rows(tiny, tmp_path):
    path = tmp_path / "ranked.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [1, 2, 3]}) + "\n")
    with pytest.raises(ValueError, match="row 1 ranks 3 responses"):
        DPOTrainer(load_stage_config(DPOConfig, None, base(tiny, tmp_path / "d", **{"data.train_file": str(path)})))


# ----------------------------------------------------------------------------------------------- SFT


def test_labels_cover_the_assistant_turns_only(tiny):
    from rlhf_fast.models import load_tokenizer

    tok = load_tokenizer(tiny["policy"])
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "the cat"}]
    ids, labels = encode_conversation(msgs, tok, True)
    full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids
    assert tok.decode(ids) == tok.decode(full)  # the pieces render the whole conversation
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert trained == "hello there<|im_end|>\nthe cat<|im_end|>\n"
    _, last = encode_conversation(msgs, tok, True, last_only=True)
    assert tok.decode([i for i, lab in zip(ids, last) if lab != IGNORE_INDEX]) == "the cat<|im_end|>\n"
    # the prompt part is exactly what the PPO trainer feeds the policy
    from rlhf_fast.data import encode

    assert ids[: len(encode(msgs[:1], tok, True))] == encode(msgs[:1], tok, True)
    plain_ids, plain_labels = encode_conversation(msgs[:2], tok, False)
    assert plain_labels[-1] == tok.eos_token_id and plain_labels[0] == IGNORE_INDEX


def test_sft_fused_loss_equals_full_logits_loss_and_training_lowers_it(tiny, data, tmp_path):
    cfg = load_stage_config(SFTConfig, None, base(tiny, tmp_path / "sft", **{"data.train_file": data["sft"], "train.epochs": 8,
                                                                            "train.lr_schedule": "constant", "train.lr": 3e-3}))
    trainer = SFTTrainer(cfg)
    batch = trainer.train_set[:4]
    fused, _ = trainer.compute_loss(batch)
    fused.backward()
    g_fused = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    trainer.model.zero_grad()
    from rlhf_fast.trainers.backend import get_backend

    trainer.backend = get_backend("eager")
    eager, _ = trainer.compute_loss(batch)
    eager.backward()
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    for n, p in trainer.model.named_parameters():
        torch.testing.assert_close(g_fused[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    trainer.model.zero_grad()
    trainer.backend = get_backend("fused")
    trainer.train()
    rows = read_metrics(tmp_path / "sft")
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"] - 0.3


def test_packing_changes_layout_not_loss(tiny, data, tmp_path):
    plain = SFTTrainer(load_stage_config(SFTConfig, None, base(tiny, tmp_path / "a", **{"data.train_file": data["sft"], "data.eval_fraction": 0.0})))
    packed = SFTTrainer(load_stage_config(SFTConfig, None, base(tiny, tmp_path / "b", **{"data.train_file": data["sft"], "data.eval_fraction": 0.0,
                                                                                         "data.packing": True, "data.max_length": 96})))
    assert len(packed.train_set) < len(plain.train_set) and max(len(r.ids) for r in packed.train_set) <= 96
    with torch.no_grad():
        loss_plain, s1 = plain.compute_loss(plain.train_set)
        loss_packed, s2 = packed.compute_loss(packed.train_set)
    assert s1["tokens"] == s2["tokens"]
    torch.testing.assert_close(loss_packed, loss_plain, rtol=1e-5, atol=1e-6)


def test_interrupted_sft_resumes_to_the_same_run(tiny, data, tmp_path):
    over = {"data.train_file": data["sft"], "train.max_steps": 4, "train.eval_every": 2, "save_every": 1}
    full = SFTTrainer(load_stage_config(SFTConfig, None, base(tiny, tmp_path / "full", **over)))
    full.train()
    cut = SFTTrainer(load_stage_config(SFTConfig, None, base(tiny, tmp_path / "cut", **over)))
    step = cut.run_unit

    def step_then_signal(stop):
        out = step(stop)
        if cut.step == 1:  # the step counter moves after run_unit: this is step 2
            os.kill(os.getpid(), signal.SIGINT)
        return out

    cut.run_unit = step_then_signal
    assert cut.train()["status"] == "interrupted"
    resumed = SFTTrainer(load_stage_config(SFTConfig, None, base(tiny, tmp_path / "cut", **over)), resume=tmp_path / "cut")
    assert resumed.step == 2 and resumed.train()["status"] == "completed"
    assert read_metrics(tmp_path / "full") == read_metrics(tmp_path / "cut")
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n


class HeadSpy:
    """A trainer backend that records the dtypes of the (hidden, weight) it is given for log-probs."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def logprobs(self, hidden, weight, *args, **kwargs):
        self.seen.append((hidden.dtype, weight.dtype))
        return self.inner.logprobs(hidden, weight, *args, **kwargs)


def test_bf16_gives_the_fused_head_bf16_operands(tiny, data, tmp_path):
    # fp32 operands would take the GPU kernels' exact-fp32 dots (no tensor cores); the weight's gradient stays fp32
    losses = {}
    for flag in ("false", "true"):
        cfg = load_stage_config(SFTConfig, None, base(tiny, tmp_path / flag, **{"data.train_file": data["sft"], "model.bf16": flag}))
        trainer = SFTTrainer(cfg)
        trainer.backend = spy = HeadSpy(trainer.backend)
        loss, _ = trainer.compute_loss(trainer.train_set[:4])
        loss.backward()
        dtype = torch.bfloat16 if flag == "true" else torch.float32
        assert spy.seen == [(dtype, dtype)]
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trainer.model.parameters())
        losses[flag] = loss.item()
    assert losses["true"] == pytest.approx(losses["false"], rel=2e-2)

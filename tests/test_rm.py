"""Reward models: each loss against hand-computed values, the metrics against NumPy/SciPy, a tiny random-weight
Llama learning "longer is better", the saved folder as plain transformers and the PPO reward loader read it,
multi-objective heads, and ``rlhf-fast rm-eval``."""
import json
import math
import random

import numpy as np
import pytest
import torch
from ppo_tiny import make_tiny_models

from rlhf_fast.cli import main
from rlhf_fast.rm_losses import (adjacent_ranking_loss, bradley_terry_loss, centering_penalty, pairwise_loss, plackett_luce_loss,
                                 ranking_loss)
from rlhf_fast.rm_metrics import calibration, evaluate_rewards, pair_arrays, plot_reliability, preference_accuracy, rank_correlations
from rlhf_fast.tracking import read_metrics
from rlhf_fast.trainers.rm import RewardModelTrainer, RMConfig, evaluate_folder
from rlhf_fast.trainers.stage import load_stage_config

WORDS = "good bad happy sad door window cat dog sun rain tea bike park".split()


def ls(x):  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------------------------- losses


def test_bradley_terry_with_margin_by_hand():
    rw, rl = torch.tensor([1.0, 0.5, -2.0]), torch.tensor([0.0, 1.0, -1.0])
    assert bradley_terry_loss(rw, rl).item() == pytest.approx((ls(1.0) + ls(-0.5) + ls(-1.0)) / 3, rel=1e-6)
    m = torch.tensor([0.5, 0.0, 1.0])
    assert bradley_terry_loss(rw, rl, m).item() == pytest.approx((ls(0.5) + ls(-0.5) + ls(-2.0)) / 3, rel=1e-6)
    assert bradley_terry_loss(rw, rl, 0.25).item() == pytest.approx((ls(0.75) + ls(-0.75) + ls(-1.25)) / 3, rel=1e-6)
    # the K=2 case of the all-pairs form is the same loss
    assert pairwise_loss(torch.stack([rw, rl], 1), margin=m).item() == pytest.approx(bradley_terry_loss(rw, rl, m).item(), rel=1e-6)


def test_pairwise_over_k_responses_by_hand():
    r = torch.tensor([[2.0, 0.0, 1.0]])
    want = (ls(2.0) + ls(1.0) + ls(-1.0)) / 3  # pairs (0,1), (0,2), (1,2), best first
    assert pairwise_loss(r).item() == pytest.approx(want, rel=1e-6)
    # a tie between responses 1 and 2 removes their pair
    assert pairwise_loss(r, strict=torch.tensor([[True, False]])).item() == pytest.approx((ls(2.0) + ls(1.0)) / 2, rel=1e-6)


def test_adjacent_ranking_by_hand():
    r = torch.tensor([[3.0, 1.0, 2.0], [0.5, -0.5, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])  # row 2 has two responses
    want = ((ls(2.0) + ls(-1.0)) + ls(1.0)) / 2
    assert adjacent_ranking_loss(r, mask).item() == pytest.approx(want, rel=1e-6)
    assert adjacent_ranking_loss(r, mask, margin=0.5).item() == pytest.approx(((ls(1.5) + ls(-1.5)) + ls(0.5)) / 2, rel=1e-6)
    assert ranking_loss("adjacent", r, mask).item() == pytest.approx(want, rel=1e-6)


def test_plackett_luce_by_hand():
    r = torch.tensor([[2.0, 1.0, 0.0]])
    want = -((2 - math.log(math.e**2 + math.e + 1)) + (1 - math.log(math.e + 1)))
    assert plackett_luce_loss(r).item() == pytest.approx(want, rel=1e-6)
    # K = 2: Plackett-Luce is Bradley-Terry
    assert plackett_luce_loss(torch.tensor([[0.3, 1.1]])).item() == pytest.approx(ls(-0.8), rel=1e-6)
    # padding: a row with two responses of three
    rp = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 123.0]])
    mask = torch.tensor([[True] * 3, [True, True, False]])
    assert plackett_luce_loss(rp, mask).item() == pytest.approx((want + ls(-2.0)) / 2, rel=1e-6)
    # ties (Breslow): responses 0 and 1 tied above 2 -> each chosen from all three, response 2 adds nothing
    lse = math.log(math.e**2 + math.e + 1)
    tied = plackett_luce_loss(r, strict=torch.tensor([[False, True]])).item()
    assert tied == pytest.approx(-((2 - lse) + (1 - lse)), rel=1e-6)


def test_plackett_luce_gradients_are_finite_with_padding():
    r = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, True, True, False]])
    assert torch.autograd.gradcheck(lambda x: plackett_luce_loss(x, mask), (r,))
    plackett_luce_loss(r, mask).backward()
    assert torch.isfinite(r.grad).all() and (r.grad[1, 2:] == 0).all()


def test_centering_penalty_by_hand():
    r = torch.tensor([[1.0, 3.0, 0.0], [-1.0, 0.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert centering_penalty(r, mask).item() == pytest.approx((2.0**2 + (4 / 3) ** 2) / 2, rel=1e-6)


def test_loss_input_errors():
    with pytest.raises(ValueError, match="rewards: expected \\[B, K\\]"):
        plackett_luce_loss(torch.zeros(3))
    with pytest.raises(ValueError, match="mask: every row needs at least 2"):
        adjacent_ranking_loss(torch.zeros(1, 3), torch.tensor([[True, False, False]]))
    with pytest.raises(ValueError, match="kind: expected one of"):
        ranking_loss("hinge", torch.zeros(1, 2))
    with pytest.raises(ValueError, match="chosen_rewards, rejected_rewards"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


# ----------------------------------------------------------------------------------------------- metrics


def test_metrics_against_numpy_and_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    groups = [rng.normal(size=k).tolist() for k in (2, 3, 4, 5, 3)]
    targets = [sorted(rng.normal(size=len(g)).tolist(), reverse=True) for g in groups]
    strict = [[True] * (len(g) - 1) for g in groups]
    better, worse = pair_arrays(groups, strict)
    assert better.size == sum(len(g) * (len(g) - 1) // 2 for g in groups)
    manual = [g[i] > g[j] for g in groups for i in range(len(g)) for j in range(i + 1, len(g))]
    assert preference_accuracy(better, worse) == pytest.approx(np.mean(manual))
    corr = rank_correlations(groups, targets)
    # Spearman = Pearson of ranks (NumPy), averaged over groups of >= 3
    rho = [np.corrcoef(stats.rankdata(g), stats.rankdata(t))[0, 1] for g, t in zip(groups, targets) if len(g) >= 3]
    assert corr["spearman"] == pytest.approx(np.mean(rho))
    tau = [stats.kendalltau(g, t).statistic for g, t in zip(groups, targets) if len(g) >= 3]
    assert corr["kendall"] == pytest.approx(np.mean(tau))
    flat_g, flat_t = sum(groups, []), sum(targets, [])
    assert corr["spearman_global"] == pytest.approx(np.corrcoef(stats.rankdata(flat_g), stats.rankdata(flat_t))[0, 1])
    # a known case: perfectly ordered rewards
    assert rank_correlations([[3, 2, 1]], [[9, 5, 0]])["kendall"] == pytest.approx(1.0)
    assert rank_correlations([[1, 2, 3]], [[9, 5, 0]])["spearman"] == pytest.approx(-1.0)


def test_calibration_against_a_manual_computation(tmp_path):
    d = np.array([2.0, -0.3, 0.1, 4.0, -2.5, 0.7, 0.0, 1.2])  # r_better - r_worse
    cal = calibration(d, np.zeros_like(d), n_bins=5)
    p = 1 / (1 + np.exp(-d))
    conf, correct = np.maximum(p, 1 - p), (d > 0) + 0.5 * (d == 0)
    ece = 0.0
    for lo in np.arange(0.5, 1.0, 0.1):
        hi = lo + 0.1
        sel = (conf >= lo) & ((conf < hi) | (hi >= 1.0 - 1e-12))
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    assert cal["ece"] == pytest.approx(ece)
    assert sum(b["count"] for b in cal["bins"]) == d.size
    # perfectly calibrated on average: confidence 0.8, right 80% of the time
    logit = math.log(0.8 / 0.2)
    assert calibration([logit] * 8 + [-logit] * 2, [0.0] * 10)["ece"] == pytest.approx(0.0, abs=1e-12)
    out = plot_reliability(cal["bins"], tmp_path / "rel.png")
    assert out.stat().st_size > 1000
    m = evaluate_rewards([[1.0, 0.0], [0.0, 2.0]], [[True], [True]], [[1, 0], [1, 0]])
    assert m["accuracy"] == 0.5 and m["margin"] == pytest.approx(-0.5) and m["reward_mean"] == pytest.approx(0.75)


# ----------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny"))


def length_pairs(path, n, seed, objective=None, longer_wins=True):
    """Pairs where the longer response wins (or the shorter): a preference a reward model learns in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        short = " ".join(rng.choices(WORDS, k=rng.randint(1, 3)))
        long = short + " " + " ".join(rng.choices(WORDS, k=rng.randint(4, 8)))
        c, r = (long, short) if longer_wins else (short, long)
        row = {"prompt": f"Tell me about the {rng.choice(WORDS)}.", "chosen": c, "rejected": r}
        if objective:
            row["objective"] = objective
        rows.append(row)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def rm_config(tiny, tmp_path, **over):
    base = {"model.backbone": tiny["policy"], "output_dir": str(tmp_path / "rm"), "threads": 1, "progress_bar": False,
            "train.lr": 3e-3, "train.batch_size": 8, "train.micro_batch_size": 4, "train.max_steps": 12, "train.lr_schedule": "constant"}
    return load_stage_config(RMConfig, None, base | over)


def test_reward_model_learns_longer_is_better(tiny, tmp_path):
    train = length_pairs(tmp_path / "train.jsonl", 64, 0)
    held = length_pairs(tmp_path / "held.jsonl", 24, 1)
    trainer = RewardModelTrainer(rm_config(tiny, tmp_path, **{"data.train_file": train, "data.eval_file": held}))
    result = trainer.train()
    rows = read_metrics(tmp_path / "rm")
    assert rows[0]["eval/accuracy"] < 0.9  # an untrained head does not know it yet
    assert result["eval/accuracy"] >= 0.9, result
    assert rows[-1]["loss"] < rows[1]["loss"]
    assert (tmp_path / "rm" / "reliability.png").is_file() and (tmp_path / "rm" / "eval_metrics.json").is_file()
    assert 0 <= result["eval/ece"] <= 0.5 and math.isnan(result["eval/spearman_global"])  # no ratings: no global correlation


def test_saved_folder_is_what_transformers_and_the_ppo_reward_loader_read(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_fast.rewards import RewardModel

    train = length_pairs(tmp_path / "train.jsonl", 16, 0)
    trainer = RewardModelTrainer(rm_config(tiny, tmp_path, **{"data.train_file": train, "train.max_steps": 2}))
    trainer.train()
    final = tmp_path / "rm" / "final"
    prompts = ["Tell me about the cat.", "Tell me about the sun."]
    responses = ["good dog", "sad rain window door cat tea bike"]
    ours = RewardModel(str(final), torch.device("cpu"))(prompts, responses)
    from rlhf_fast.preference_data import Preference
    from rlhf_fast.trainers.rm import encode_preferences

    prefs = [Preference(1, [{"role": "user", "content": p}], [r, "x y"], [True], [1.0, 0.0]) for p, r in zip(prompts, responses)]
    enc, _ = encode_preferences(prefs, trainer.tokenizer, trainer.cfg.data, {"reward": 0}, "t")
    trained = [float(s[0, 0]) for s in trainer.all_scores(enc)]
    np.testing.assert_allclose(ours, trained, rtol=1e-5, atol=1e-6)
    # plain transformers, batch of one, no padding: the same score
    model = AutoModelForSequenceClassification.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.num_labels == 1
    text = tok.apply_chat_template([{"role": "user", "content": prompts[1]}, {"role": "assistant", "content": responses[1]}], tokenize=False)
    with torch.no_grad():
        plain = model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    assert plain == pytest.approx(trained[1], rel=1e-5, abs=1e-6)


def test_linear_probe_equals_full_forward_and_trains_only_the_head(tiny, tmp_path):
    train = length_pairs(tmp_path / "train.jsonl", 16, 0)
    trainer = RewardModelTrainer(rm_config(tiny, tmp_path, **{"data.train_file": train, "model.train_layers": 0, "train.max_steps": 3}))
    assert [n for n, p in trainer.model.named_parameters() if p.requires_grad] == ["score.weight"]
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert changed == ["score.weight"]
    cached = trainer.all_scores(trainer.train_set[:4])
    trainer.frozen_backbone = False  # the same rows through the backbone again
    fresh = trainer.all_scores(trainer.train_set[:4])
    for a, b in zip(cached, fresh):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    top = RewardModelTrainer(rm_config(tiny, tmp_path / "top", **{"data.train_file": train, "model.train_layers": 1}))
    names = {n for n, p in top.model.named_parameters() if p.requires_grad}
    assert "score.weight" in names and any(".layers.1." in n for n in names) and not any(".layers.0." in n for n in names)


def test_multi_objective_heads_learn_their_own_labels(tiny, tmp_path):
    path = tmp_path / "mo.jsonl"
    length_pairs(path, 48, 0, objective="verbose", longer_wins=True)
    length_pairs(path, 48, 1, objective="terse", longer_wins=False)
    held = tmp_path / "held.jsonl"
    length_pairs(held, 12, 2, objective="verbose", longer_wins=True)
    length_pairs(held, 12, 3, objective="terse", longer_wins=False)
    over = {"data.train_file": str(path), "data.eval_file": str(held), "train.max_steps": 16,
            "model.heads": [{"name": "verbose", "weight": 1.0}, {"name": "terse", "weight": 0.25}]}
    trainer = RewardModelTrainer(rm_config(tiny, tmp_path, **over))
    result = trainer.train()
    assert result["eval/verbose/accuracy"] >= 0.9 and result["eval/terse/accuracy"] >= 0.9, result
    final = tmp_path / "rm" / "final"
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    heads = load_file(final / "heads.safetensors")["weight"]
    combined = AutoModelForSequenceClassification.from_pretrained(final).score.weight
    torch.testing.assert_close(combined, 1.0 * heads[:1] + 0.25 * heads[1:], rtol=1e-6, atol=1e-7)
    metrics = evaluate_folder(str(final), str(held), tmp_path / "eval")
    assert metrics["verbose/accuracy"] >= 0.9 and metrics["terse/accuracy"] >= 0.9
    # a row that names no head, with several heads, is an error naming the row
    bad = tmp_path / "bad.jsonl"
    length_pairs(bad, 2, 0)
    with pytest.raises(ValueError, match="row 1: no 'objective' field"):
        RewardModelTrainer(rm_config(tiny, tmp_path / "b", **(over | {"data.train_file": str(bad)})))


def test_ranked_rows_train_with_each_ranking_loss(tiny, tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(24):
        base = " ".join(rng.choices(WORDS, k=2))
        resp = [base + " " + " ".join(rng.choices(WORDS, k=n)) for n in (0, 3, 6)]
        rows.append({"prompt": f"Q {i}", "responses": resp[::-1], "ranking": [1, 2, 3]})  # longest first
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for kind in ("pairwise", "adjacent", "plackett_luce"):
        t = RewardModelTrainer(rm_config(tiny, tmp_path / kind, **{"data.train_file": str(path), "loss.type": kind,
                                                                   "loss.center_coef": 0.1, "data.eval_fraction": 0.25}))
        result = t.train()
        assert math.isfinite(result["loss"]) and "loss/centering" in result
        assert result["eval/kendall"] > 0.5, (kind, result)  # rank correlation with the given rankings


def test_rm_eval_cli_and_data_errors(tiny, tmp_path, capsys):
    train = length_pairs(tmp_path / "train.jsonl", 16, 0)
    RewardModelTrainer(rm_config(tiny, tmp_path, **{"data.train_file": train, "train.max_steps": 2})).train()
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": "Q", "responses": [f"a {i}", f"b {i}", f"c {i}"], "scores": [3, 2, 1]}) + "\n"
                            for i in range(5)))
    rc = main(["rm-eval", str(tmp_path / "rm" / "final"), str(held), "--out", str(tmp_path / "ev")])
    assert rc == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for k in ("accuracy", "margin", "spearman", "kendall", "spearman_global", "ece", "reward_mean", "reward_std"):
        assert k in metrics
    assert metrics["rows"] == 5 and metrics["pairs"] == 15 and (tmp_path / "ev" / "reliability.png").is_file()
    with open(held, "a") as f:
        f.write(json.dumps({"prompt": "Q", "chosen": "same", "rejected": "same"}) + "\n")
    capsys.readouterr()
    assert main(["rm-eval", str(tmp_path / "rm" / "final"), str(held), "--out", str(tmp_path / "ev")]) == 2
    assert "error: DATA row 6: tie" in capsys.readouterr().err
    assert main(["rm-eval", str(tmp_path / "rm" / "final"), str(held), "--out", str(tmp_path / "ev"), "--skip-invalid"]) == 0
    # the training command reports a bad row and a bad key as one error line
    assert main(["rm", f"--model.backbone={tiny['policy']}", f"--data.train_file={held}", f"--output_dir={tmp_path / 'x'}"]) == 2
    assert "error: data.train_file row 6: tie" in capsys.readouterr().err
    assert main(["rm", "--loss.typ=pairwise"]) == 2
    assert "did you mean 'type'" in capsys.readouterr().err

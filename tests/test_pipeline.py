"""The three-stage pipeline end to end on a tiny random-weight Llama (pairs -> reward model -> PPO -> eval),
its resume, and the pieces it is made of."""
import json

import pytest
from ppo_tiny import make_tiny_models

from rlhf_fast.cli import main
from rlhf_fast.pipeline import Pipeline, PipelineConfig, judged_pairs, split_prompt_rows
from rlhf_fast.trainers.stage import load_stage_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny"))


def overrides(tiny, out):
    return {"policy": tiny["policy"], "judge": "ppo_tiny:letter_reward", "output_dir": str(out), "progress_bar": False,
            "num_train_prompts": 24, "num_eval_prompts": 8, "sample_batch_size": 16, "rm.train.epochs": 20,
            "ppo.ppo.iterations": 2, "ppo.ppo.batch_size": 8, "ppo.ppo.minibatch_size": 4, "ppo.ppo.micro_batch_size": 4,
            "ppo.generation.max_new_tokens": 8}


def test_judged_pairs_drop_ties_and_empty_responses():
    rows, stats = judged_pairs(["p1", "p2", "p3", "p4"], ["a", "b", "", "d"], ["x", "y", "z", "d"], [0.1, 0.5, 0.2, 0.3], [0.9, 0.5, 0.1, 0.3])
    assert stats == {"pairs": 1, "ties_dropped": 2, "empty_dropped": 1}
    assert rows == [{"prompt": "p1", "chosen": "x", "rejected": "a", "score_chosen": 0.9, "score_rejected": 0.1}]


def test_prompt_split_uses_the_split_column_or_a_seeded_fraction(tmp_path):
    train, held = split_prompt_rows("builtin:everyday_prompts", 0.2, 0)
    assert (len(train), len(held)) == (264, 66) and "split" not in train[0]
    plain = tmp_path / "p.jsonl"
    plain.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(10)))
    a, b = split_prompt_rows(str(plain), 0.3, 5)
    assert (len(a), len(b)) == (7, 3) and (a, b) == split_prompt_rows(str(plain), 0.3, 5)


def test_pipeline_end_to_end_and_resume(tiny, tmp_path):
    out = tmp_path / "pipe"
    result = Pipeline(load_stage_config(PipelineConfig, None, overrides(tiny, out))).train()
    assert result["status"] == "completed"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"]["train"]["pairs"] >= 4 and summary["pairs"]["eval"]["pairs"] >= 2
    held = summary["rm"]["heldout"]
    assert 0 <= held["accuracy"] <= 1 and held["pairs"] == summary["pairs"]["eval"]["pairs"]
    for key in ("judge_before", "judge_after", "rm_before", "rm_after", "gap_before", "gap_after"):
        assert isinstance(summary["eval"]["heldout"][key], float), key
    curve = summary["curve"]
    assert curve["iteration"] == [1, 2] and len(curve["gap"]) == 2 and all(isinstance(g, float) for g in curve["gap"])
    assert summary["ppo"]["reward_names"] == ["final", "ppo_tiny.letter_reward"]
    for f in ("pairs_train.jsonl", "pairs_eval.jsonl", "curves.png", "after.jsonl", "rm/final/config.json", "rm_eval/reliability.png",
              "ppo/final/config.json"):
        assert (out / f).is_file(), f
    # the judged pairs are ordinary preference data
    first = json.loads((out / "pairs_train.jsonl").read_text().splitlines()[0])
    assert first["score_chosen"] > first["score_rejected"]
    # PPO saw the learned reward model with weight 1 and the judge with weight 0
    ppo_cfg = (out / "ppo" / "config.yaml").read_text()
    assert str(out / "rm" / "final") in ppo_cfg and "weight: 0.0" in ppo_cfg
    # resume: every finished stage is reused (nothing re-sampled), the evaluation is redone
    mtime = (out / "pairs_train.jsonl").stat().st_mtime_ns
    assert main(["pipeline", "--resume", str(out), "--progress_bar=false"]) == 0
    assert (out / "pairs_train.jsonl").stat().st_mtime_ns == mtime
    assert json.loads((out / "summary.json").read_text())["eval"]["heldout"]["judge_before"] == summary["eval"]["heldout"]["judge_before"]


def test_pipeline_config_errors(tiny, tmp_path, capsys):
    assert main(["pipeline", "--ppo.ppo.lrr=1"]) == 2
    assert "unknown config key 'ppo.ppo.lrr'" in capsys.readouterr().err
    assert main(["pipeline", "--num_train_prompts=1"]) == 2
    assert "num_train_prompts: must be >= 2" in capsys.readouterr().err
    assert main(["pipeline", "--rm.loss.type=hinge"]) == 2
    assert "loss.type: expected one of" in capsys.readouterr().err
    # YAML sections keep the pipeline's other defaults (here: PPO's critic sharing and batch sizes)
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text("ppo:\n  ppo:\n    lr: 1.0e-5\nrm:\n  train:\n    epochs: 3\n")
    cfg = load_stage_config(PipelineConfig, cfg_file)
    assert cfg.ppo.ppo.lr == 1e-5 and cfg.ppo.critic.share_backbone and cfg.ppo.ppo.batch_size == 16
    assert cfg.rm.train.epochs == 3 and cfg.rm.model.train_layers == 0


def test_shipped_stage_configs_load():
    from pathlib import Path

    from rlhf_fast.trainers.dpo import DPOConfig
    from rlhf_fast.trainers.rm import RMConfig
    from rlhf_fast.trainers.sft import SFTConfig

    classes = {"rm": RMConfig, "sft": SFTConfig, "dpo": DPOConfig, "pipeline": PipelineConfig}
    found = 0
    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        cls = classes.get(path.name.split("_")[0])
        if cls is not None:
            load_stage_config(cls, path)
            found += 1
    assert found >= 5
    # the written-out pipeline config is the default
    import dataclasses

    shipped = load_stage_config(PipelineConfig, Path(__file__).parent.parent / "configs" / "pipeline_smollm2.yaml")
    assert dataclasses.asdict(shipped) == dataclasses.asdict(load_stage_config(PipelineConfig))

"""Each bad input named in the issue raises a one-line UserError (and the CLI prints it without a traceback)."""
import json

import pytest
from ppo_tiny import make_tiny_models, tiny_config

from rlhf_fast.cli import main
from rlhf_fast.errors import UserError
from rlhf_fast.trainers.ppo import RLTrainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny"))


def _raises(cfg, match):
    with pytest.raises(UserError, match=match) as err:
        RLTrainer(cfg)
    assert "\n" not in str(err.value)


def test_missing_model_path(tiny, tmp_path):
    _raises(tiny_config(str(tmp_path / "nope"), tmp_path / "run"), r"model.policy: path .*nope.* does not exist")


def test_folder_without_config_is_not_a_model(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    _raises(tiny_config(str(tmp_path / "empty"), tmp_path / "run"), "no config.json")


def test_non_causal_lm_model(tiny, tmp_path):
    _raises(tiny_config(tiny["rm"], tmp_path / "run"), "is not a causal language model")


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("ppo_tiny:no_such_function", "has no function 'no_such_function'"),
    ("sentiment please", "expected 'vader', 'module:function'"),
    ("/no/such/reward_model", "expected 'vader', 'module:function'"),
])
def test_bad_reward_spec(tiny, tmp_path, spec, match):
    _raises(tiny_config(tiny["policy"], tmp_path / "run", **{"reward.sources": [{"spec": spec}]}), match)


def test_reward_model_with_more_than_one_label(tiny, tmp_path):
    _raises(tiny_config(tiny["policy"], tmp_path / "run", **{"reward.sources": [{"spec": tiny["rm2"]}]}), "has 2 labels")


def test_empty_prompt_file(tiny, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    _raises(tiny_config(tiny["policy"], tmp_path / "run", **{"data.prompt_file": str(tmp_path / "empty.jsonl")}), "holds no prompts")


def test_missing_prompt_file_and_bad_rows(tiny, tmp_path):
    _raises(tiny_config(tiny["policy"], tmp_path / "run", **{"data.prompt_file": str(tmp_path / "x.jsonl")}), "not found")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    _raises(tiny_config(tiny["policy"], tmp_path / "run", **{"data.prompt_file": str(tmp_path / "bad.jsonl")}),
            "needs a 'prompt' string or a chat 'messages' list")


def test_prompt_longer_than_limit(tiny, tmp_path):
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "word " * 200}) + "\n" + json.dumps({"prompt": "short"}) + "\n")
    cfg = tiny_config(tiny["policy"], tmp_path / "run", **{"data.prompt_file": str(tmp_path / "long.jsonl")})
    _raises(cfg, r"1 prompt\(s\) longer than data.max_prompt_length=64")


def test_prompt_plus_response_beyond_context(tiny, tmp_path):
    # the tiny policy has max_position_embeddings=256
    cfg = tiny_config(tiny["policy"], tmp_path / "run", **{"data.max_prompt_length": 200, "generation.max_new_tokens": 100})
    _raises(cfg, "exceeds the model's context of 256 tokens")


def test_mismatched_tokenizers_between_critic_and_reward_model(tiny, tmp_path):
    cfg = tiny_config(tiny["policy"], tmp_path / "run", **{"critic.init_from": "reward", "reward.sources": [{"spec": tiny["rm"]}]})
    _raises(cfg, "has a different tokenizer than the policy")


def test_unknown_config_key_from_the_cli(tiny, tmp_path, capsys):
    assert main(["ppo", f"--model.policy={tiny['policy']}", "--ppo.learning_rate=1e-5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'ppo.learning_rate'") and "valid keys in section 'ppo'" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_cli_reports_bad_model_in_one_line(tmp_path, capsys):
    assert main(["ppo", f"--model.policy={tmp_path / 'missing'}", f"--output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.policy: path") and "Traceback" not in err


def test_resume_without_a_run_dir(tmp_path, capsys):
    assert main(["ppo", "--resume", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_trainable_layers_beyond_the_model(tiny, tmp_path):
    _raises(tiny_config(tiny["policy"], tmp_path / "run", **{"model.trainable_layers": 3}), r"model.trainable_layers: expected 1..2")

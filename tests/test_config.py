"""The config tree: YAML + overrides with type coercion, unknown keys and bad values named."""
import pytest

from rlhf_fast.config import Config, RewardSource, load_config, parse_overrides
from rlhf_fast.errors import UserError


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config) and cfg.ppo.gamma == 1.0 and cfg.ppo.lam == 0.95 and cfg.ppo.clip_eps == 0.2


def test_yaml_then_overrides_with_coercion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nppo:\n  lr: 1.0e-4\n  kl_target: 6\nreward:\n  sources:\n    - {spec: vader, weight: 2}\n")
    cfg = load_config(path, ["--ppo.lr=3e-5", "--model.lora.enabled", "true", "--ppo.kl_target=null", "--eval.num_prompts=8",
                             "--model.lora.target_modules=q_proj,v_proj", "--reward.sources=[{spec: 'm:f', weight: 0.5}, {spec: vader}]"])
    assert cfg.seed == 3 and cfg.ppo.lr == 3e-5 and isinstance(cfg.ppo.lr, float)
    assert cfg.model.lora.enabled is True and cfg.ppo.kl_target is None and cfg.eval.num_prompts == 8
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.reward.sources == [RewardSource("m:f", 0.5), RewardSource("vader", 1.0)]


def test_yaml_int_for_float_field_becomes_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ppo:\n  kl_coef: 1\n")
    assert isinstance(load_config(path).ppo.kl_coef, float)


@pytest.mark.parametrize("overrides, match", [
    (["--ppo.lrr=1"], r"unknown config key 'ppo.lrr' \(did you mean 'lr'\?\); valid keys in section 'ppo': iterations"),
    (["--nope=1"], "unknown config key 'nope'; valid keys at the top level: output_dir"),
    (["--model.lora.rank=4"], "unknown config key 'model.lora.rank'.*valid keys in section 'model.lora'"),
    (["--ppo.lr=fast"], "ppo.lr: expected a number, got 'fast'"),
    (["--ppo.iterations=2.5"], "ppo.iterations: expected an integer"),
    (["--model.lora.enabled=maybe"], "model.lora.enabled: expected true or false"),
    (["--seed.x=1"], "'seed' is a value, not a section"),
    (["--ppo.batch_size=10", "--ppo.minibatch_size=4"], "must be a multiple"),
    (["--kernels=fast"], "kernels: expected one of fused, eager"),
    (["--ppo.kl_estimator=k9"], "ppo.kl_estimator: expected one of"),
    (["--ppo.lr"], "has no value"),
    (["--model.lora.enabled=true", "--model.trainable_layers=2"], "set one of them"),
    (["positional"], "unexpected argument 'positional'"),
])
def test_bad_overrides(overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(None, overrides)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("generation:\n  max_tokens: 10\n")
    with pytest.raises(UserError, match="unknown config key 'generation.max_tokens'.*max_new_tokens"):
        load_config(path)
    path.write_text("reward:\n  sources:\n    - {spec: vader, wieght: 2}\n")
    with pytest.raises(UserError, match=r"unknown config key 'reward.sources\[0\].wieght'"):
        load_config(path)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("ppo: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b=1", "--c", "x y", "--d-e=2"]) == [("a.b", "1"), ("c", "x y"), ("d_e", "2")]


def test_shipped_configs_load():
    from pathlib import Path

    # the other stages' configs are checked by test_shipped_stage_configs_load
    for path in sorted(Path(__file__).parent.parent.glob("configs/ppo_*.yaml")):
        load_config(path)


def test_auto_attention_takes_flash_attn_only_for_half_precision_on_cuda(monkeypatch):
    # flash-attn rejects fp32 activations: a model run without bf16 autocast must get sdpa even when it is installed
    import importlib.util

    import torch

    from rlhf_fast.models import attn_implementation

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else find_spec(name, *a))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attn_implementation("auto", cuda, True) == "flash_attention_2"
    assert attn_implementation("auto", cuda, False) == "sdpa"
    assert attn_implementation("auto", cpu, True) == "sdpa"
    assert attn_implementation("eager", cuda, True) == "eager"


def test_compile_follows_the_flag_and_lifts_the_recompile_limit(monkeypatch):
    # policy, reference and critic share one compiled forward: its ~8 variants must not hit dynamo's default limit of 8
    import torch
    import torch._dynamo

    from rlhf_fast.models import maybe_compile

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    m = torch.nn.Linear(2, 2)
    assert maybe_compile(m, "auto", torch.device("cpu")) is m
    assert maybe_compile(m, "false", torch.device("cuda")) is m
    assert torch._dynamo.config.recompile_limit == 8
    assert maybe_compile(m, "auto", torch.device("cuda")) is not m
    assert torch._dynamo.config.recompile_limit >= 32

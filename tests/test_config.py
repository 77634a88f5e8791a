"""The config tree: YAML + overrides with type coercion, unknown keys and bad values named."""
import pytest

from rlhf_fast.config import Config, LoraConfig, RewardSource, load_config, load_structured, parse_overrides, resume_config_path, save_config
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
    (["--seed=none"], "seed: expected an integer, got 'none'"),  # not optional: null is a wrong type, not None
    (["--ppo.adam_betas=0.9,x"], r"ppo.adam_betas\[1\]: expected a number, got 'x'"),
    (["--reward.sources=[{spec: a}, {weight: x}]"], r"reward.sources\[1\].weight: expected a number, got 'x'"),
    (["--reward.sources=vader"], r"reward.sources\[0\]: expected a mapping, got 'vader'"),
    (["--ppo=fast"], "ppo: expected a mapping, got 'fast'"),
    (["--ppo.lrr.x=1"], r"unknown config key 'ppo.lrr' \(did you mean 'lr'\?\)"),
    (["--ppo..lr=1"], "config key 'ppo..lr' has an empty part"),
    (["--model.lora.target_modules=[q_proj"], "model.lora.target_modules: the value is not valid YAML"),
    ({"ppo.lr": True}, "ppo.lr: expected a number, got 'true'"),
    ({"model.lora.r": 2.5}, "model.lora.r: expected an integer, got 2.5"),
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


def test_override_forms_keep_the_fields_types():
    cfg = load_config(None, ["--model.bf16=true", "--model.compile", "false", "--data.system_prompt=none", "--model.policy=none",
                             "--critic.lr=~", "--ppo.kl_target=6", "--ppo.clip_eps_high=NULL", "--progress_bar=no",
                             "--model.lora.enabled=on", "--model.gradient_checkpointing=yes", "--data.chat_template=off",
                             "--model.lora.target_modules=[q_proj, v_proj]", "--ppo={lr: 2e-5, adam_betas: [0.8, 0.9]}",
                             "--reward.sources[0].weight=3"])
    # bf16/compile are string fields that spell true/false; null/none clears an optional field only
    assert cfg.model.bf16 == "true" and cfg.model.compile == "false"
    assert cfg.data.system_prompt is None and cfg.model.policy == "none" and cfg.critic.lr is None and cfg.ppo.clip_eps_high is None
    assert cfg.ppo.kl_target == 6.0 and isinstance(cfg.ppo.kl_target, float)
    assert cfg.progress_bar is False and cfg.model.lora.enabled is True and cfg.model.gradient_checkpointing is True
    assert cfg.data.chat_template is False
    assert cfg.ppo.lr == 2e-5 and cfg.ppo.adam_betas == [0.8, 0.9] and cfg.ppo.iterations == Config().ppo.iterations
    assert cfg.reward.sources == [RewardSource("vader", 3.0)]
    # plain dataclasses and lists again, not OmegaConf containers
    assert type(cfg.model.lora) is LoraConfig and type(cfg.model.lora.target_modules) is list
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"] and type(cfg.reward.sources[0]) is RewardSource
    # a dict override takes Python values; a bool into a string field is spelled as the word
    cfg = load_config(None, {"model.bf16": False, "ppo.iterations": 3, "data.system_prompt": None, "generation.temperature": 1})
    assert cfg.model.bf16 == "false" and cfg.ppo.iterations == 3 and cfg.data.system_prompt is None
    assert isinstance(cfg.generation.temperature, float)


def test_strings_are_literal():
    # OmegaConf would read ${...} as an interpolation: a prompt or path keeps it as written
    prompt = "Answer in ${currency}; a \\${x} and ${"
    cfg = load_config(None, {"data.system_prompt": prompt, "model.lora.target_modules": ["${a}", "b"]})
    assert cfg.data.system_prompt == prompt and cfg.model.lora.target_modules == ["${a}", "b"]


def test_yaml_errors_name_the_full_key(tmp_path):
    path = tmp_path / "c.yaml"
    for text, match in [("ppo: 3\n", "ppo: expected a mapping, got 3"), ("ppo:\n", "ppo: expected a mapping, got None"),
                        ("seed: null\n", "seed: expected an integer, got None"), ("seed: {x: 1}\n", "seed: expected an integer"),
                        ("model:\n  lora:\n    enabled: maybe\n", "model.lora.enabled: expected true or false, got 'maybe'"),
                        ("reward:\n  sources:\n    - {spec: a}\n    - {weight: heavy}\n", r"reward.sources\[1\].weight: expected a number"),
                        ("- 1\n", "expected a mapping at the top level")]:
        path.write_text(text)
        with pytest.raises(UserError, match=match):
            load_config(path)


def test_yaml_section_keeps_the_other_defaults(tmp_path):
    # a list item gets its class's defaults; a section only changes the keys it names, even where the enclosing
    # config's defaults for it differ from the section class's (the pipeline's embedded PPO config)
    from dataclasses import dataclass, field

    @dataclass
    class Outer:
        ppo: Config = field(default_factory=lambda: Config(seed=7))
        tag: str = "x"

    path = tmp_path / "c.yaml"
    path.write_text("ppo:\n  ppo:\n    lr: 1.0e-4\n  reward:\n    sources:\n      - {weight: 2}\n  model:\n    bf16: true\n")
    cfg = load_structured(Outer, path, ["--tag=y"])
    assert cfg.ppo.seed == 7 and cfg.ppo.ppo.lr == 1e-4 and cfg.ppo.ppo.iterations == Config().ppo.iterations and cfg.tag == "y"
    assert cfg.ppo.reward.sources == [RewardSource("vader", 2.0)] and cfg.ppo.model.bf16 == "true"


def test_saved_config_round_trips_and_resumes(tmp_path):
    over = ["--model.bf16=true", "--data.system_prompt=Be ${brief}: yes", "--ppo.kl_target=6", "--critic.lr=null",
            "--reward.sources=[{spec: 'm:f', weight: 0.5}, {spec: vader}]", "--model.lora.target_modules=q_proj", "--seed=5"]
    cfg = load_config(None, over)
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    assert load_config(run / "config.yaml") == cfg
    # a resumed run reads its own config.yaml, overrides still apply on top
    resumed = load_config(resume_config_path(None, str(run)), ["--seed=6"])
    assert resumed.seed == 6 and resumed.data.system_prompt == "Be ${brief}: yes" and resumed.reward.sources == cfg.reward.sources
    with pytest.raises(UserError, match="no config.yaml"):
        resume_config_path(None, str(tmp_path))


def test_shipped_configs_load():
    from pathlib import Path

    # every RL config (one per algorithm); the other stages' configs are checked by test_shipped_stage_configs_load
    rl = [p for p in sorted(Path(__file__).parent.parent.glob("configs/*.yaml")) if p.name.split("_")[0] not in ("rm", "sft", "dpo", "pipeline")]
    estimators = {load_config(path).algorithm.adv_estimator for path in rl}
    assert estimators == {"gae", "grpo", "rloo", "reinforce", "reinforce_pp", "remax"}, estimators


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

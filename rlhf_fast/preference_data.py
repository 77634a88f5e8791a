"""Preference and SFT data in the formats users already have, validated row by row.

Sources: a JSONL file (one object per line; ``.json`` may also hold one JSON array), a Parquet file
(read with pyarrow), or a folder written by ``datasets``' ``save_to_disk`` (a ``DatasetDict``'s "train"
split trains, its "test"/"validation" split evaluates). Row formats:

- pairwise: ``{"prompt", "chosen", "rejected"}``; each a string or a chat ``messages`` list. Without a
  ``prompt``, ``chosen``/``rejected`` are whole conversations and the prompt is their shared prefix (the
  HH-RLHF / TRL "implicit prompt" layout). Optional ``margin`` (>= 0, the Llama-2 margin) and
  ``score_chosen``/``score_rejected`` ratings.
- ranked: ``{"prompt", "responses": [...], "ranking": [...]}`` with ``ranking[i]`` the rank of ``responses[i]``
  (1 = best; 0-based also accepted), or ``"scores": [...]`` (higher = better, ties allowed but not all equal).
- SFT: ``{"prompt", "response"}`` (``completion`` also accepted) or ``{"messages"}`` (loss on assistant turns).

Every row may carry ``objective`` (the reward head it labels, for multi-objective reward models).
A missing field, an empty string, a tie in a pairwise row, a ranking that is not a permutation (and
the like) raise UserError naming the row; with ``skip_invalid`` such rows are dropped and counted.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .data import EVAL_SPLITS
from .errors import UserError

Messages = list[dict]


@dataclass
class Preference:
    """One prompt with k >= 2 responses, best first."""

    row: int  # 1-based row number in its source (the line number for JSONL)
    prompt: Messages  # chat messages before the responses (the last is usually the user's)
    responses: list[str]  # best first
    strict: list[bool]  # strict[i]: responses[i] is strictly preferred to responses[i + 1] (k - 1 flags)
    ratings: list[float]  # higher = better, aligned with responses: given scores, or minus the rank
    rated: bool = False  # ratings are given scores (not derived from an order)
    margin: float = 0.0  # required reward gap for pairwise rows (Touvron et al. 2023, eq. 2)
    objective: str | None = None

    @property
    def prompt_text(self) -> str:
        """The last user message (what the PPO trainer's reward functions receive as the prompt)."""
        users = [m["content"] for m in self.prompt if m["role"] == "user"]
        return users[-1] if users else self.prompt[-1]["content"]


@dataclass
class Conversation:
    """An SFT example: the loss falls on the assistant messages."""

    row: int
    messages: Messages


@dataclass
class Loaded:
    train: list
    eval: list
    skipped: int = 0  # invalid rows dropped under skip_invalid
    first_error: str | None = None


# ----------------------------------------------------------------------------------------------- reading


def _jsonl_rows(path: Path, what: str) -> list[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise UserError(f"{what}: {str(path)!r} is not valid JSON ({e.msg}, line {e.lineno})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{what} row {n}: not valid JSON ({e.msg}); expected one JSON object per line") from None
    return rows


def read_splits(spec: str, what: str) -> dict[str, list[tuple[int, Any]]]:
    """``{split: [(row number, row), ...]}`` of a JSONL/JSON/Parquet file ("train" only) or a saved ``datasets`` folder."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{what}: {spec!r} not found")
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"{what}: {spec!r} is a folder but not a dataset saved with save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            return {name: list(enumerate(split.to_list(), 1)) for name, split in ds.items()}
        return {"train": list(enumerate(ds.to_list(), 1))}
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return {"train": list(enumerate(pq.read_table(path).to_pylist(), 1))}
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise UserError(f"{what}: cannot read Parquet file {spec!r}: {e}") from None
    if path.suffix in (".jsonl", ".json"):
        return {"train": _jsonl_rows(path, what)}
    raise UserError(f"{what}: {spec!r} should be a .jsonl/.json or .parquet file, or a folder saved with datasets.save_to_disk")


# ----------------------------------------------------------------------------------------------- fields


def _fail(what: str, n: int, msg: str) -> UserError:
    return UserError(f"{what} row {n}: {msg}")


def _text(value: Any, field: str, what: str, n: int) -> str:
    if not isinstance(value, str):
        raise _fail(what, n, f"field {field!r} must be a string or a chat message list, got {type(value).__name__}")
    if not value.strip():
        raise _fail(what, n, f"field {field!r} is an empty string")
    return value


def _messages(value: Any, field: str, what: str, n: int) -> Messages:
    if not isinstance(value, list) or not value:
        raise _fail(what, n, f"field {field!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _fail(what, n, f"{field}[{i}] must be a {{role, content}} message, got {m!r}")
        out.append(dict(role=str(m["role"]), content=_text(m["content"], f"{field}[{i}].content", what, n)))
    return out


def _as_messages(value: Any, field: str, what: str, n: int, role: str) -> Messages:
    """A string becomes one message of ``role``; a list is checked as chat messages."""
    if not isinstance(value, (str, list)):
        raise _fail(what, n, f"field {field!r} must be a string or a chat message list, got {type(value).__name__}")
    return [dict(role=role, content=_text(value, field, what, n))] if isinstance(value, str) else _messages(value, field, what, n)


def _get(row: dict, field: str, what: str, n: int, needed: str) -> Any:
    if field not in row or row[field] is None:
        raise _fail(what, n, f"missing field {field!r} ({needed})")
    return row[field]


def _response(value: Any, field: str, what: str, n: int) -> str:
    """A response: a string, or a message list whose last message is the assistant's answer."""
    if isinstance(value, dict):  # a single message
        value = [value]
    msgs = _as_messages(value, field, what, n, "assistant")
    if msgs[-1]["role"] != "assistant":
        raise _fail(what, n, f"field {field!r}: the last message must be the assistant's, got role {msgs[-1]['role']!r}")
    return msgs[-1]["content"]


def _number(value: Any, field: str, what: str, n: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(what, n, f"field {field!r} must be a finite number, got {value!r}")
    return float(value)


def _objective(row: dict, what: str, n: int) -> str | None:
    obj = row.get("objective")
    if obj is None:
        return None
    return _text(obj, "objective", what, n)


# ----------------------------------------------------------------------------------------------- rows


def _pairwise(row: dict, what: str, n: int) -> Preference:
    needed = "a pairwise row needs prompt, chosen, rejected"
    chosen_v, rejected_v = _get(row, "chosen", what, n, needed), _get(row, "rejected", what, n, needed)
    prompt_v = row.get("prompt")
    if prompt_v is None:
        if isinstance(chosen_v, str) or isinstance(rejected_v, str):
            _get(row, "prompt", what, n, needed)  # raises: string responses need a prompt
        c, r = _messages(chosen_v, "chosen", what, n), _messages(rejected_v, "rejected", what, n)
        k = 0
        while k < min(len(c), len(r)) - 1 and c[k] == r[k]:
            k += 1
        if k == 0 or c[k:-1] or r[k:-1]:
            raise _fail(what, n, "without a 'prompt', 'chosen' and 'rejected' must be conversations that share every "
                                 "message but the last (the assistant's answer)")
        prompt = c[:k]
        chosen, rejected = _response(c[k:], "chosen", what, n), _response(r[k:], "rejected", what, n)
    else:
        prompt = _as_messages(prompt_v, "prompt", what, n, "user")
        chosen, rejected = _response(chosen_v, "chosen", what, n), _response(rejected_v, "rejected", what, n)
    if chosen == rejected:
        raise _fail(what, n, "tie: 'chosen' and 'rejected' are the same response, so the row states no preference")
    ratings, rated = [1.0, 0.0], False
    if row.get("score_chosen") is not None or row.get("score_rejected") is not None:
        sc = _number(row.get("score_chosen"), "score_chosen", what, n)
        sr = _number(row.get("score_rejected"), "score_rejected", what, n)
        if sc == sr:
            raise _fail(what, n, f"tie: score_chosen == score_rejected == {sc}, so the row states no preference")
        if sc < sr:
            raise _fail(what, n, f"score_chosen ({sc}) is below score_rejected ({sr}): chosen and rejected are swapped")
        ratings, rated = [sc, sr], True
    margin = 0.0
    if row.get("margin") is not None:
        margin = _number(row["margin"], "margin", what, n)
        if margin < 0:
            raise _fail(what, n, f"margin must be >= 0, got {margin}")
    return Preference(n, prompt, [chosen, rejected], [True], ratings, rated, margin, _objective(row, what, n))


def _ranked(row: dict, what: str, n: int) -> Preference:
    needed = "a ranked row needs prompt, responses, and ranking or scores"
    prompt = _as_messages(_get(row, "prompt", what, n, needed), "prompt", what, n, "user")
    resp_v = row["responses"]
    if not isinstance(resp_v, list) or len(resp_v) < 2:
        raise _fail(what, n, "'responses' must be a list of at least 2 responses")
    responses = [_response(r, f"responses[{i}]", what, n) for i, r in enumerate(resp_v)]
    if len(set(responses)) < len(responses):
        raise _fail(what, n, "'responses' holds the same response twice")
    k = len(responses)
    if row.get("ranking") is not None:
        ranking = row["ranking"]
        ok = isinstance(ranking, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in ranking)
        if not ok or len(ranking) != k or sorted(ranking) not in (list(range(k)), list(range(1, k + 1))):
            raise _fail(what, n, f"'ranking' {ranking!r} is not a permutation of 1..{k} "
                                 f"(the rank of each of the {k} responses, 1 = best)")
        order = sorted(range(k), key=lambda i: ranking[i])
        ratings = [-float(ranking[i]) for i in order]
        strict, rated = [True] * (k - 1), False
    else:
        scores_v = _get(row, "scores", what, n, needed)
        if not isinstance(scores_v, list) or len(scores_v) != k:
            raise _fail(what, n, f"'scores' must be a list of {k} numbers, one per response")
        scores = [_number(s, f"scores[{i}]", what, n) for i, s in enumerate(scores_v)]
        if len(set(scores)) == 1:
            raise _fail(what, n, f"tie: every response has the score {scores[0]}, so the row states no preference")
        order = sorted(range(k), key=lambda i: -scores[i])
        ratings = [scores[i] for i in order]
        strict, rated = [a > b for a, b in zip(ratings, ratings[1:])], True
    return Preference(n, prompt, [responses[i] for i in order], strict, ratings, rated, 0.0, _objective(row, what, n))


def parse_preference(row: Any, what: str, n: int) -> Preference:
    """A validated :class:`Preference` from a pairwise or ranked row; UserError naming row ``n`` otherwise."""
    if not isinstance(row, dict):
        raise _fail(what, n, f"expected an object, got {type(row).__name__}")
    if "responses" in row:
        return _ranked(row, what, n)
    return _pairwise(row, what, n)


def parse_conversation(row: Any, what: str, n: int) -> Conversation:
    """A validated SFT :class:`Conversation` from ``{prompt, response}`` or ``{messages}``."""
    if not isinstance(row, dict):
        raise _fail(what, n, f"expected an object, got {type(row).__name__}")
    if row.get("messages") is not None:
        msgs = _messages(row["messages"], "messages", what, n)
        if not any(m["role"] == "assistant" for m in msgs):
            raise _fail(what, n, "'messages' holds no assistant message to train on")
        return Conversation(n, msgs)
    needed = "an SFT row needs prompt and response, or messages"
    prompt = _as_messages(_get(row, "prompt", what, n, needed), "prompt", what, n, "user")
    key = "completion" if row.get("response") is None and row.get("completion") is not None else "response"
    response = _response(_get(row, key, what, n, needed), key, what, n)
    return Conversation(n, prompt + [dict(role="assistant", content=response)])


# ----------------------------------------------------------------------------------------------- datasets


def _parse_all(rows: list[tuple[int, Any]], parse: Callable, what: str, skip_invalid: bool, errors: list[str]) -> list:
    out = []
    for n, row in rows:
        try:
            out.append(parse(row, what, n))
        except UserError as e:
            if not skip_invalid:
                raise
            errors.append(str(e))
    return out


def _is_eval(row: Any, split_column: str) -> bool:
    return isinstance(row, dict) and str(row.get(split_column, "")).lower() in EVAL_SPLITS


def load_examples(data_cfg, kind: str, seed: int = 0, what: str = "data") -> Loaded:
    """Train/eval examples of ``kind`` ("preference" or "sft") as ``data_cfg`` says.

    The eval split is, in order of precedence: ``data.eval_file``; a saved DatasetDict's "test"/"validation"
    split; rows whose ``data.split_column`` says eval/test/validation; else a seeded ``data.eval_fraction``.
    """
    parse = {"preference": parse_preference, "sft": parse_conversation}[kind]
    if not data_cfg.train_file:
        raise UserError(f"{what}.train_file: no training data given (a JSONL/Parquet file or a saved datasets folder)")
    splits = read_splits(data_cfg.train_file, f"{what}.train_file")
    train_rows = splits.get("train")
    if train_rows is None:
        raise UserError(f"{what}.train_file: the saved DatasetDict has no 'train' split (has {sorted(splits)})")
    eval_rows: list | None = None
    if data_cfg.eval_file:
        eval_rows = read_splits(data_cfg.eval_file, f"{what}.eval_file").get("train") or []
    else:
        eval_rows = next((splits[s] for s in EVAL_SPLITS if s in splits), None)
    if eval_rows is None and any(_is_eval(r, data_cfg.split_column) for _, r in train_rows):
        eval_rows = [(n, r) for n, r in train_rows if _is_eval(r, data_cfg.split_column)]
        train_rows = [(n, r) for n, r in train_rows if not _is_eval(r, data_cfg.split_column)]
    errors: list[str] = []
    train = _parse_all(train_rows, parse, f"{what}.train_file", data_cfg.skip_invalid, errors)
    if eval_rows is not None:
        source = f"{what}.{'eval_file' if data_cfg.eval_file else 'train_file'}"
        evals = _parse_all(eval_rows, parse, source, data_cfg.skip_invalid, errors)
    else:  # a fixed random fraction is held out
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = int(len(train) * data_cfg.eval_fraction)
        held = set(order[:n_eval])
        evals = [ex for i, ex in enumerate(train) if i in held]
        train = [ex for i, ex in enumerate(train) if i not in held]
    if not train:
        why = f" ({len(errors)} invalid, first: {errors[0]})" if errors else ""
        raise UserError(f"{what}.train_file: no valid training rows{why}")
    return Loaded(train, evals, len(errors), errors[0] if errors else None)


def with_system_prompt(msgs: Messages, system_prompt: str | None) -> Messages:
    if system_prompt and msgs[0]["role"] != "system":
        return [dict(role="system", content=system_prompt)] + msgs
    return msgs

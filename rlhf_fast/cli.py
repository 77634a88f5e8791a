"""``rlhf-fast <command>``: one table of subcommands.

A training command is one line in COMMANDS naming a trainer class with ``from_cli(config, overrides, resume)``
and ``train()``; e.g. ``"sft": Trainer("rlhf_fast.trainers.sft:SFTTrainer", "supervised fine-tuning")``.
Modules load lazily, so ``--help`` stays fast. Bad input (UserError) prints one ``error:`` line, exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a CPU shared with other
# processes, spinning threads wait for descheduled peers and burn the cores (generation measured 10-20x
# slower on this 2-core machine under load); alone on the machine the difference is within noise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import UserError


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Trainer:
    """A training subcommand: ``--config YAML``, ``--resume RUN_DIR`` and ``--section.key=value`` overrides."""

    target: str  # "module:Class"
    help: str

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML config file (the defaults when omitted; a resumed run reads RUN_DIR/config.yaml)")
        p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
        p.epilog = "Any config key can be overridden: --ppo.lr=2e-5 --generation.max_new_tokens 64 ..."

    def run(self, args: argparse.Namespace, extra: list[str]) -> int:
        trainer = _load(self.target).from_cli(args.config, extra, args.resume)
        result = trainer.train()
        if result.get("status") == "interrupted":
            return 130
        return 0


@dataclass(frozen=True)
class Tool:
    """A non-training subcommand: ``module:add_arguments`` and ``module:run(args) -> exit code``."""

    module: str
    help: str

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        _load(f"{self.module}:add_arguments")(p)

    def run(self, args: argparse.Namespace, extra: list[str]) -> int:
        if extra:
            raise UserError(f"unexpected arguments: {' '.join(extra)}")
        return _load(f"{self.module}:run")(args)


COMMANDS = {
    "ppo": Trainer("rlhf_fast.trainers.ppo:RLTrainer", "train a policy with PPO (Ziegler et al. 2019); the same loop as `rl`"),
    "rl": Trainer("rlhf_fast.trainers.ppo:RLTrainer", "RL on a reward: PPO, GRPO, RLOO, REINFORCE, REINFORCE++, ReMax; PPO or TRPO updates "
                  "(algorithm.adv_estimator, algorithm.policy_update)"),
    "plot": Tool("rlhf_fast.plot", "plot a run's training curves to a PNG"),
    "sft": Trainer("rlhf_fast.trainers.sft:SFTTrainer", "supervised fine-tuning on prompt/response pairs or chat messages"),
    "rm": Trainer("rlhf_fast.trainers.rm:RewardModelTrainer", "train a reward model on preference pairs or rankings"),
    "rm-eval": Tool("rlhf_fast.trainers.rm", "evaluate a reward-model folder on preference data (accuracy, correlation, calibration)"),
    "dpo": Trainer("rlhf_fast.trainers.dpo:DPOTrainer", "Direct Preference Optimization (Rafailov et al. 2023) or IPO"),
    "pipeline": Trainer("rlhf_fast.pipeline:Pipeline", "sample pairs, judge them, train a reward model, run PPO on it, evaluate"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-fast", description="Lean PPO/RLHF on fused log-prob kernels.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():  # no abbreviations: --res must not silently mean --resume
        cmd.add_arguments(sub.add_parser(name, help=cmd.help, description=cmd.help, allow_abbrev=False))
    return parser


def _rank() -> str:
    """"rank R of N: " under torchrun (every rank reports its own error), else nothing."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return f"rank {os.environ.get('RANK', '?')} of {size}: " if size > 1 else ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        return COMMANDS[args.command].run(args, extra)
    except UserError as e:
        print(f"error: {_rank()}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop without a checkpoint
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # under torchrun, say which rank failed before the traceback (the others fail in a collective)
        if _rank():
            print(f"error: {_rank()}{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    sys.exit(main())

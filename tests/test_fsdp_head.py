"""add_fused_lm_head under FSDP2 (2 processes, gloo, CPU): per-token log-probs and entropies, and the gradients
FSDP reduce-scatters, equal a single process's on the whole batch (the model's own logits.log_softmax, float64)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
WORLD, ROWS = 2, 3  # rows of the batch per rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, cases) -> None:
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_fast.integrations.hf import add_fused_lm_head

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for tie, head_unit in cases:
            torch.manual_seed(0)
            cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=tie)
            model = LlamaForCausalLM(cfg)
            ref = LlamaForCausalLM(cfg).double()
            ref.load_state_dict(model.state_dict())
            for layer in model.model.layers:
                fully_shard(layer)
            if head_unit:
                fully_shard(model.lm_head)
            fully_shard(model)
            add_fused_lm_head(model, outputs=("log_probs", "entropy"))
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, cfg.vocab_size, (WORLD * ROWS, 9), generator=g)
            labels = ids.clone()
            labels[:, :3] = -100  # prompt
            labels[0, 6] = -100  # a hole
            mine = slice(rank * ROWS, (rank + 1) * ROWS)
            out = model(input_ids=ids[mine], labels=labels[mine], fused_lm_head=True)
            (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()

            logp = ref(input_ids=ids).logits[:, :-1].log_softmax(-1)  # float64, the whole batch
            y = labels[:, 1:]
            valid = y != -100
            want_lp = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
            want_ent = -(logp.exp() * logp).sum(-1) * valid
            # FSDP averages gradients over ranks: the single-process loss is the mean of the ranks' losses
            ((want_lp.sum() + 0.5 * want_ent.sum()) / WORLD).backward()
            what = f"tie={tie} head_unit={head_unit} rank={rank}"
            torch.testing.assert_close(out.log_probs.double(), want_lp[mine], atol=2e-6, rtol=0, msg=what)
            torch.testing.assert_close(out.entropy.double(), want_ent[mine], atol=2e-6, rtol=0, msg=what)
            for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
                got = p.grad.full_tensor().double()
                torch.testing.assert_close(got, q.grad, atol=2e-6 * max(1.0, q.grad.abs().max().item()), rtol=0,
                                           msg=f"{what} {name}")
    finally:
        dist.destroy_process_group()


def test_fused_head_under_fsdp2_matches_one_process():
    # the head in the root's unit (untied and tied embeddings), and as its own unit (sharded outside its forward)
    mp.spawn(_worker, args=(_free_port(), [(False, False), (True, False), (False, True)]), nprocs=WORLD)

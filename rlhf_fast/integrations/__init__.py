"""Adapters that plug rlhf_fast's fused ops into other libraries' models.

Each submodule imports its library on first use only: ``import rlhf_fast.integrations`` costs nothing.

- :mod:`rlhf_fast.integrations.hf`: :func:`~rlhf_fast.integrations.hf.add_fused_lm_head` gives any Hugging Face
  causal LM (optionally PEFT-wrapped) a ``fused_lm_head=True`` forward that returns per-token log-probs, entropy
  and exact KL without ever forming the [tokens x vocab] logits.
- :mod:`rlhf_fast.integrations.trl`: :func:`~rlhf_fast.integrations.trl.use_rlhf_fast` puts TRL 1.16's trainers
  (GRPO, RLOO, DPO, SFT, KTO) on that head, and optionally GRPO's whole clipped loss on ``ops.linear_ppo_loss``.
"""

__all__ = ["hf", "trl"]

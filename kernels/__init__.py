"""Triton kernels behind rlhf_fast.ops' "triton" backend (installed as ``rlhf_fast_kernels``).

Pure functions on tensors: no autograd and no knowledge of rlhf_fast. Each runs on CUDA tensors, or on
CPU tensors under ``TRITON_INTERPRET=1`` (the tests). Import the modules:
  linear_logprobs     linear_logprobs_fwd / linear_logprobs_bwd (fused log-probs + entropy)
  linear_kl           linear_kl_fwd / linear_kl_bwd (exact KL to a reference head)
  fused_linear_loss   fused_linear_loss (single-pass per-token loss + gradients, e.g. PPO)
  gae                 gae (parallel scan over time)
  matmul              matmul_acc (fp32 C += A @ B), matmul_into (C = A @ B, any dtypes, fp32 accumulation)
(Functions are not re-exported here: ``gae`` and ``fused_linear_loss`` would shadow their modules.)
"""

"""rlhf_fast: a lean PPO/RLHF trainer on fused log-prob kernels."""
__version__ = "0.1.0"

"""Training loops built on ``rlhf_fast.ops``."""

"""agrpo: RL post-training for masked diffusion language models (AGRPO and diffu-GRPO)."""

__version__ = "0.1.0"

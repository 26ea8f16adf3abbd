"""mlx-reasoner: GRPO + LoRA reasoning training on MLX.

The package follows the data flow, one module per stage:
data -> prompts -> rollout -> rewards -> advantages -> loss -> trainer -> checkpoints/ui,
with a thin click CLI (``cli``) on top.
"""

__version__ = "0.1.0"

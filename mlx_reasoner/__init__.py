"""mlx-reasoner: GRPO + LoRA reasoning training on MLX.

The package follows the data flow, one module per stage:
data -> prompts -> rollout -> rewards -> advantages -> logprobs / objective -> trainer ->
checkpoints / ui, wired by ``run`` under a thin click CLI (``cli``). Backend-specific speed-ups
live in ``engine``, reached only through ``backend``; ``showcase`` holds the demo, the bench and
the model builders. Importing the package loads nothing: commands that compute call
``backend.start()`` first (see docs/architecture.md).
"""

__version__ = "0.1.0"

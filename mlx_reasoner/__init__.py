"""mlx-reasoner: GRPO + LoRA reasoning training on MLX.

The package follows the data flow, one module per stage:
data -> prompts -> rollout -> rewards -> advantages -> loss -> trainer -> checkpoints/ui,
with a thin click CLI (``cli``) on top.
"""

# Before anything imports mlx: on Linux, load OpenBLAS so MLX's CPU matmuls bind to it, not to the
# slow reference BLAS in the mlx[cpu] wheel. Every submodule import runs this file first.
from mlx_reasoner.blas import enable_fast_blas

enable_fast_blas()

__version__ = "0.1.0"

"""mlx-reasoner: GRPO + LoRA reasoning training on MLX.

The package follows the data flow, one module per stage:
data -> prompts -> rollout -> rewards -> advantages -> loss -> trainer -> checkpoints/ui,
with a thin click CLI (``cli``) on top.
"""

# Before anything imports mlx: on Linux, load OpenBLAS so MLX's CPU matmuls bind to it, not to the
# slow reference BLAS in the mlx[cpu] wheel. Every submodule import runs this file first.
from mlx_reasoner.blas import enable_fast_blas

enable_fast_blas()

# Then, on MLX's Linux CPU backend, let glibc reuse freed blocks instead of unmapping them
# (host_memory.py: large arrays otherwise fault in every page at each allocation).
from mlx_reasoner.host_memory import keep_freed_memory  # noqa: E402

keep_freed_memory()

__version__ = "0.1.0"

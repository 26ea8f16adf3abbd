"""The engine: speed-ups measured on particular backends, kept out of the training pipeline.

- ``blas`` / ``blas_alias``: a fast OpenBLAS for MLX's Linux CPU wheel, loaded before ``mlx.core``;
- ``cpu_math``: faster SwiGLU and attention on x86-64 CPUs, and RoPE shared across blocks;
- ``compiled_decode`` / ``fused_decode`` / ``kv_buffers`` / ``addmm_lora``: the fixed-shape,
  compiled decode that replaces mlx-lm's ``BatchGenerator`` on the CPU;
- ``streams``: the training pass's rows split over two CPU streams.

The pipeline reaches these only through ``mlx_reasoner.backend``, which falls back to stock MLX
and mlx-lm when the engine is switched off (``MLX_REASONER_ENGINE=0``) or absent. Submodules
are imported on first use, so importing this package loads nothing.
"""

"""Float32 matmul GFLOP/s on MLX's CPU stream, and which BLAS MLX is using.

python scripts/matmul_bench.py                            # OpenBLAS, if it loads
MLX_REASONER_FAST_BLAS=0 python scripts/matmul_bench.py   # mlx[cpu]'s reference BLAS
OPENBLAS_NUM_THREADS=1 python scripts/matmul_bench.py     # one OpenBLAS thread
"""

import argparse
import os
import platform

# Importing the package first is what loads the fast BLAS, before mlx is imported.
from mlx_reasoner.engine.blas import describe
from mlx_reasoner.showcase.bench import matmul_gflops


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per size (median)")
    args = parser.parse_args()

    import mlx.core as mx

    print(f"{describe()}; mlx {mx.__version__}; {platform.machine()}, {os.cpu_count()} cores")
    for n in args.sizes:
        gflops = matmul_gflops(n, repeats=args.repeats)
        milliseconds = 2 * n**3 / gflops / 1e6
        print(f"n={n:5d}  {gflops:8.1f} GFLOP/s  {milliseconds:9.2f} ms per matmul")


if __name__ == "__main__":
    main()

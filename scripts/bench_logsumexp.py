"""Log-sum-exp over [4, 128, V]: cpu_math's former polynomial against mx.logsumexp (forward +
gradient, in turns).

Usage: python scripts/bench_logsumexp.py V [V ...]
"""

from mlx_reasoner import backend  # noqa: I001

backend.start()  # first: the fast BLAS must load before anything imports mlx

import sys
import time

import mlx.core as mx

from mlx_reasoner.engine.cpu_math import exp_polynomial


@mx.custom_function
def polynomial_logsumexp(x):  # what cpu_math.logsumexp was until 2026-12-06
    top = mx.stop_gradient(mx.max(x, axis=-1, keepdims=True))
    return (mx.log(mx.sum(exp_polynomial(x - top), axis=-1, keepdims=True)) + top)[..., 0]


@polynomial_logsumexp.vjp
def _vjp(primals, cotangent, output):
    return cotangent[..., None] * exp_polynomial(primals - output[..., None])


def run(fn, x, w):
    g = mx.grad(lambda x: (fn(x) * w).sum())
    mx.eval(g(x))  # warm
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        mx.eval(g(x))
        ts.append(time.perf_counter() - t)
    return min(ts), (mx.get_peak_memory() - base) / 1e6


for V in [int(v) for v in sys.argv[1:]]:
    x = mx.random.normal((4, 128, V))
    w = mx.random.normal((4, 128))
    mx.eval(x, w)
    res = {}
    for _ in range(2):
        for name, fn in (
            ("poly", polynomial_logsumexp),
            ("mlx", lambda x: mx.logsumexp(x, axis=-1)),
        ):
            t, m = run(fn, x, w)
            res.setdefault(name, []).append((t, m))
    p = min(res["poly"])
    q = min(res["mlx"])
    print(
        f"V={V}: poly {p[0]*1e3:.1f} ms +{p[1]:.0f} MB | mlx {q[0]*1e3:.1f} ms +{q[1]:.0f} MB",
        f"| poly/mlx {p[0]/q[0]:.2f}",
        flush=True,
    )

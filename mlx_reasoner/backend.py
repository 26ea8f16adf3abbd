"""The one door between the training pipeline and the engine (``mlx_reasoner.engine``).

The pipeline calls only these functions. Each uses the engine's speed-up where the engine
chose to apply one, and stock MLX / mlx-lm otherwise: with ``MLX_REASONER_ENGINE=0``, or with
the engine package deleted, training gives the same results, only more slowly.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable

ENGINE_SWITCH = "MLX_REASONER_ENGINE"
OFF_VALUES = {"0", "false", "off", "no"}


def switched_off(variable: str) -> bool:
    """Whether the environment variable ``variable`` turns something off (0, false, off, no)."""
    return os.environ.get(variable, "").strip().lower() in OFF_VALUES


def engine_enabled() -> bool:
    """Whether the engine is installed and not switched off by ``MLX_REASONER_ENGINE``."""
    return not switched_off(ENGINE_SWITCH) and _engine_installed()


@functools.cache
def _engine_installed() -> bool:
    return importlib.util.find_spec("mlx_reasoner.engine") is not None


def _engine(name: str):
    """The engine's submodule ``name``, or None where the engine is off."""
    return importlib.import_module(f"mlx_reasoner.engine.{name}") if engine_enabled() else None


def start() -> str:
    """Prepare the backend for a command that computes; call it before anything imports
    ``mlx.core``. On Linux this loads a fast BLAS for MLX's CPU matmuls (see ``engine.blas``).
    Idempotent. Returns one line saying which BLAS MLX uses."""
    blas = _engine("blas")
    if blas is None:
        return "BLAS: MLX's own (engine off)"
    blas.enable_fast_blas()
    return blas.describe()


def blas_summary() -> dict:
    """The BLAS decision as a JSON-ready dict (name, path, whether fast, threads, why not)."""
    blas = _engine("blas")
    if blas is None:
        return {"name": "mlx's own", "enabled": False, "reason": f"{ENGINE_SWITCH} is off"}
    return blas.blas_info().as_dict()


def slow_blas_notice(command: str) -> str | None:
    """What to tell a user before ``command`` runs on a slow BLAS, or None."""
    blas = _engine("blas")
    return None if blas is None else blas.slow_blas_notice(command)


def fast_forward(model) -> contextlib.AbstractContextManager:
    """A context in which ``model``'s forward passes (rollout and log-probabilities) may use the
    engine's faster activations; the numbers agree to float rounding."""
    cpu_math = _engine("cpu_math")
    return contextlib.nullcontext() if cpu_math is None else cpu_math.fast_activations(model)


def row_split(rows: int) -> list:
    """``(stream, rows slice)`` pairs covering ``rows``: the training pass computes each slice
    on its stream. One slice on the default stream unless the engine splits them."""
    streams = _engine("streams")
    if streams is None:
        import mlx.core as mx

        return [(mx.default_stream(mx.default_device()), slice(0, rows))]
    return streams.row_split(rows)


def compiled_decoder(model, prompts, compiled: bool | None) -> Callable | None:
    """The engine's compiled decode for this rollout, or None for mlx-lm's ``BatchGenerator``.

    Args:
        compiled: True to require the compiled decode, False to refuse it, None to take it
            where it is the default here and the model passes its check.
    """
    if compiled is False:
        return None
    decode = _engine("compiled_decode")
    if decode is None:
        if compiled:
            from .errors import ReasonerError

            raise ReasonerError(f"the compiled decode needs the engine; unset {ENGINE_SWITCH}")
        return None
    if compiled is None and not (
        decode.compiled_decode_default()
        and all(len(p) > 1 for p in prompts)
        and decode.compiled_decode_supported(model)
    ):
        return None
    return decode.decode_compiled


def uses_compiled_decode() -> bool:
    """Whether rollouts take the compiled decode by default here (for memory estimates)."""
    decode = _engine("compiled_decode")
    return decode is not None and decode.compiled_decode_default()


def describe() -> dict:
    """What the engine applies in this process, for the run's ``config.json``."""
    cpu_math, streams = _engine("cpu_math"), _engine("streams")
    return {
        "engine": "on" if engine_enabled() else f"off ({ENGINE_SWITCH})",
        "blas": blas_summary(),
        "activations": (
            "fast exp (cpu_math)" if cpu_math and cpu_math.fast_activations_apply() else "mlx-lm"
        ),
        "training_streams": streams.row_streams() if streams else 1,
    }

"""Locate the built-in prompt and reward folders, in a checkout or an installed wheel."""

from pathlib import Path

from .errors import ReasonerError

_PACKAGE_DIR = Path(__file__).resolve().parent


def builtin_dir(name: str) -> Path:
    """Return the folder holding the built-in ``prompts`` or ``rewards``.

    A wheel carries them as ``mlx_reasoner/_builtin/<name>``; a checkout (or an
    editable install) has them at the repository's top level.
    """
    for candidate in (_PACKAGE_DIR / "_builtin" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise ReasonerError(
        f"built-in folder '{name}' is missing from the installation at {_PACKAGE_DIR}; "
        "reinstall mlx-reasoner"
    )

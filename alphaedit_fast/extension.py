"""Soft loading of the compiled `alphaedit_fast._C` extension: its absence never breaks import."""

from __future__ import annotations

try:  # built by setup.py when a compiler is present; see csrc/
    from . import _C  # type: ignore[attr-defined]
except ImportError:  # no compiler, ALPHAEDIT_NO_EXT=1, or not built yet
    _C = None


def extension_available() -> bool:
    """True when the compiled extension was built and imports."""
    return _C is not None

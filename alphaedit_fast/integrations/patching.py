"""Reversible monkey-patching of other code bases: a `Patch` records every attribute it
replaces (in the patched modules and wherever a patched function was already imported by
name) and `undo()` puts the originals back."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

from ..errors import AlphaEditError


class IntegrationError(AlphaEditError, ImportError):
    """The code base to patch cannot be imported, or does not have what the patch replaces."""


_ACTIVE: dict[str, Patch] = {}


class Patch:
    """The replacements made by one `patch_*()` call; `undo()` restores them in reverse order."""

    def __init__(self, name: str):
        self.name = name
        self.replaced: list[tuple[Any, str, Any]] = []  # (owner, attribute, original value)
        self.state: dict[str, Any] = {}  # what the patched functions share (e.g. cached statistics)

    @property
    def active(self) -> bool:
        return _ACTIVE.get(self.name) is self

    def set(self, owner: Any, attribute: str, value: Any) -> None:
        """owner.attribute = value, remembering the old value."""
        self.replaced.append((owner, attribute, getattr(owner, attribute)))
        setattr(owner, attribute, value)

    def replace_function(self, module: ModuleType, name: str, new) -> None:
        """Replace `module.name` by `new`, and every other module's global bound to the same
        object (`from module import name` done before the patch)."""
        old = getattr(module, name)
        for other in list(sys.modules.values()):
            namespace = getattr(other, "__dict__", None)
            if other is module or not isinstance(namespace, dict):
                continue
            for attribute, value in list(namespace.items()):
                if value is old:
                    self.set(other, attribute, new)
        self.set(module, name, new)

    def undo(self) -> None:
        """Restore everything this patch replaced; a second call does nothing."""
        while self.replaced:
            owner, attribute, value = self.replaced.pop()
            setattr(owner, attribute, value)
        if _ACTIVE.get(self.name) is self:
            del _ACTIVE[self.name]

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def active_patch(name: str) -> Patch | None:
    """The patch of that name in force, if any (a second `patch_*()` call returns it)."""
    return _ACTIVE.get(name)


def register(patch: Patch) -> Patch:
    _ACTIVE[patch.name] = patch
    return patch


def import_module(name: str, code_base: str, hint: str) -> ModuleType:
    """Import `name`, or raise IntegrationError naming the module, the code base and the fix."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise IntegrationError(f"cannot import {name} of {code_base} ({type(err).__name__}: {err}); {hint}") from None

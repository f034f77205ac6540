"""Drop-in acceleration of existing AlphaEdit code: `patch_original()` (the original repository)
and `patch_easyedit()` (EasyEdit) make their unchanged code run on alphaedit_fast."""

from .easyedit import patch_easyedit
from .original import patch_original
from .patching import IntegrationError, Patch

__all__ = ["IntegrationError", "Patch", "patch_easyedit", "patch_original"]

"""Drop-in acceleration of existing AlphaEdit code: `patch_original()` (the original repository),
`patch_easyedit()` (EasyEdit) and `patch_alphaedit()` (the authors' `alphaedit` package) make their
unchanged code run on alphaedit_fast."""

from .alphaedit_package import patch_alphaedit
from .easyedit import patch_easyedit
from .original import patch_original
from .patching import IntegrationError, Patch

__all__ = ["IntegrationError", "Patch", "patch_alphaedit", "patch_easyedit", "patch_original"]

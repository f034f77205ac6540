# ruff: noqa: N999 - the original module names
from .AlphaEdit_main import AlphaEditHyperParams, apply_AlphaEdit_to_model  # noqa: F401

"""A stand-in for EasyEdit's `easyeditor` package, for tests only: EasyEdit's module layout and call
contracts (names, signatures, module globals), implemented here in a few lines on alphaedit_fast.reference.
None of EasyEdit's code is in it."""

from .editors import BaseEditor  # noqa: F401
from .models.alphaedit import AlphaEditHyperParams, apply_AlphaEdit_to_model  # noqa: F401

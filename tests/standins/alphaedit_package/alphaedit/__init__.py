"""Stand-in of the authors' alphaedit package (see ../README.md)."""

from .config import AlphaEditConfig
from .editor import AlphaEditor

__all__ = ["AlphaEditConfig", "AlphaEditor"]

from .editor import BaseEditor  # noqa: F401

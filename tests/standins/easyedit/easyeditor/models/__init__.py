from .alphaedit import *  # noqa: F401,F403

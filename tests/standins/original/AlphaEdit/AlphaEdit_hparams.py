# ruff: noqa: N999 - the original module names
"""Stand-in: an hparams object with the original's attribute names."""


class AlphaEditHyperParams:
    def __init__(self, **fields):
        self.__dict__.update(fields)

"""ALG_DICT as BaseEditor reads it: algorithm name -> apply function."""

from ..models.alphaedit import apply_AlphaEdit_to_model

ALG_DICT = {"AlphaEdit": apply_AlphaEdit_to_model}

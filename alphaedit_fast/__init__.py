"""alphaedit_fast: exact, fast AlphaEdit (null-space constrained knowledge editing)."""

from .arch import ModelSpec, detect
from .editor import AlphaEditor, apply_AlphaEdit_to_model
from .errors import (
    AlphaEditError,
    DistributedEditError,
    HyperParamsError,
    InvalidArgumentError,
    InvalidRequestError,
    ModelFileError,
    ModelStructureError,
    NonFiniteError,
    RequestFileError,
    ShapeError,
)
from .extension import extension_available
from .hparams import AlphaEditHyperParams
from .keys import compute_ks, get_module_input_output_at_words
from .positions import find_fact_lookup_idx, get_words_idxs_in_templates
from .projector import load_projector, nullspace_basis, nullspace_projector, save_projector
from .storage import StatsFileError
from .templates import get_context_templates
from .values import compute_z, compute_zs

__version__ = "0.1.0"

__all__ = [
    "AlphaEditError",
    "AlphaEditor",
    "AlphaEditHyperParams",
    "DistributedEditError",
    "HyperParamsError",
    "InvalidArgumentError",
    "InvalidRequestError",
    "ModelFileError",
    "ModelSpec",
    "ModelStructureError",
    "NonFiniteError",
    "RequestFileError",
    "ShapeError",
    "StatsFileError",
    "__version__",
    "apply_AlphaEdit_to_model",
    "compute_ks",
    "compute_z",
    "compute_zs",
    "detect",
    "extension_available",
    "find_fact_lookup_idx",
    "get_context_templates",
    "get_module_input_output_at_words",
    "get_words_idxs_in_templates",
    "load_projector",
    "nullspace_basis",
    "nullspace_projector",
    "save_projector",
]

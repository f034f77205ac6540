"""The oracle: a plain, readable, per-request AlphaEdit (DESIGN steps 2-6).

Every fast path is tested against these functions. They favour clarity over speed: full
forward passes, one request at a time, the dense solve of the original.
"""

from .alphaedit import (
    apply_alphaedit_ref,
    compute_ks_ref,
    compute_z_ref,
    module_reprs_at_words_ref,
    nullspace_projector_ref,
)

__all__ = [
    "apply_alphaedit_ref",
    "compute_ks_ref",
    "compute_z_ref",
    "module_reprs_at_words_ref",
    "nullspace_projector_ref",
]

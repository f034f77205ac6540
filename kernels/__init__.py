"""Triton kernels, installed as `alphaedit_fast.kernels` (never as a top-level `kernels`).

The kernels themselves arrive with the hot-op issue; importing this package never needs Triton.
"""

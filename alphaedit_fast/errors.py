"""One exception hierarchy: every error the library raises on bad input is an AlphaEditError; and
`run_reporting_errors`, how every command line turns an error into one line and an exit status."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable


class AlphaEditError(Exception):
    """Base class of every error raised by alphaedit_fast."""


class InvalidRequestError(AlphaEditError, ValueError):
    """An edit request is malformed (prompt without one `{}`, empty subject or target, ...)."""


class RequestFileError(InvalidRequestError):
    """A requests file cannot be read: missing, not UTF-8 text, not JSON/JSONL, too deeply nested."""


class ModelFileError(AlphaEditError, FileNotFoundError):
    """A model directory given on the command line does not exist or holds no model."""


class HyperParamsError(AlphaEditError, ValueError):
    """A hyper-parameter is missing, of the wrong type or out of range."""


class ModelStructureError(AlphaEditError, LookupError):
    """The model lacks a layer or module the hyper-parameters name, or its family is unknown."""


class NormalisedMLPOutputWarning(UserWarning):
    """The edited MLPs' outputs pass through a norm before the residual stream (Gemma 2 and 3's
    post_feedforward_layernorm): AlphaEdit's update assumes they add to it as they are."""


class ShapeError(AlphaEditError, ValueError):
    """A tensor argument (P, cache_c, a projector, a covariance) has the wrong type, shape or structure."""


class InvalidArgumentError(AlphaEditError, ValueError):
    """An option of a public function (solver, z_batch_size, solve_dtype, ...) is out of range."""


class DistributedEditError(AlphaEditError, RuntimeError):
    """The ranks of a data-parallel edit disagree (model, requests, hyper-parameters, weights) or
    one of them died or hung (`sharding`)."""


class NonFiniteError(AlphaEditError, FloatingPointError):
    """A tensor holds NaN or infinity where finite values are required."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def require_finite(tensor, what: str) -> None:
    """Raise NonFiniteError naming `what` when `tensor` holds NaN or inf."""
    import torch

    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(
            f"{what} contains NaN or infinite values; check how it was computed "
            "(statistics in too low a precision, a diverged optimisation, a corrupted file)."
        )


def run_reporting_errors(prog: str, debug: bool, command: Callable[[], object]) -> int:
    """Run a command; an error is one line on stderr, the traceback only with `debug`.
    Exit status: 0, 2 for bad input (an AlphaEditError), 1 for any other failure, 130 on Ctrl-C."""
    try:
        command()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            traceback.print_exc()
        elif isinstance(err, AlphaEditError):
            print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        else:
            print(f"{prog}: error: {type(err).__name__}: {' '.join(str(err).split())} (--debug for the traceback)",
                  file=sys.stderr)
        return 2 if isinstance(err, AlphaEditError) else 1
    return 0

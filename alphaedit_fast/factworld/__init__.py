"""A deterministic synthetic fact world and a tiny Llama trained on it (issue 6), used to show
AlphaEdit editing a model whose facts are known exactly.

    python -m alphaedit_fast.factworld build --out DIR       # world + tokenizer + model
    python -m alphaedit_fast.factworld.causal_trace [DIR]              # where facts are written
    alphaedit-fast eval [--model DIR]                                 # CounterFact-style metrics
"""

import json
from pathlib import Path

from ..errors import ModelFileError
from .world import World, build_world, training_texts

__all__ = ["SHIPPED_MODEL", "World", "build_world", "load_model", "load_shipped", "load_world", "training_texts"]


SHIPPED_MODEL = Path(__file__).parent / "model"


def load_world(path=None) -> World:
    """The world a fact-world model directory was trained on (None: the shipped model's)."""
    path = Path(path) if path is not None else SHIPPED_MODEL
    meta_path = path / "factworld.json"
    if not meta_path.is_file():
        raise ModelFileError(f"{path} is not a fact-world model directory (no factworld.json)")
    meta = json.loads(meta_path.read_text())
    return build_world(meta["seed"], meta["n_subjects"])


def load_model(path=None):
    """(model, tokenizer, world) of a fact-world model directory (`python -m alphaedit_fast.factworld
    build --out DIR`; None: the one shipped in the package), model in fp32, eval mode."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = Path(path) if path is not None else SHIPPED_MODEL
    world = load_world(path)
    model = LlamaForCausalLM.from_pretrained(path, local_files_only=True).float().eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok, world


def load_shipped():
    """(model, tokenizer, world) of the model shipped in the package."""
    return load_model(None)

"""A deterministic synthetic fact world and a tiny Llama trained on it (issue 6), used to show
AlphaEdit editing a model whose facts are known exactly.

    python -m alphaedit_fast.factworld build --out DIR       # world + tokenizer + model
    python -m alphaedit_fast.factworld.editcheck DIR --trace --grid
"""

from .world import World, build_world, training_texts

__all__ = ["World", "build_world", "load_shipped", "training_texts"]


def load_shipped():
    """(model, tokenizer, world) of the model shipped in the package, model in fp32, eval mode."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer, LlamaForCausalLM

    path = Path(__file__).parent / "model"
    meta = json.loads((path / "factworld.json").read_text())
    model = LlamaForCausalLM.from_pretrained(path, local_files_only=True).float().eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok, build_world(meta["seed"], meta["n_subjects"])

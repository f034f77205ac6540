"""Stand-in cli: the package's options and outputs; like the package's, no `__main__` block."""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import AlphaEditConfig
from .editor import AlphaEditor


def build_parser():
    parser = argparse.ArgumentParser(description="Edit a dense Qwen model with AlphaEdit.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--requests", required=True, type=Path)
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--stats-dir", type=Path, default=Path("data/stats"))
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--state", type=Path)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.device.startswith("cuda"):
        raise ValueError("--device must be a CUDA device such as cuda:0")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "right"
    payload = json.loads(args.requests.read_text())
    editor = AlphaEditor(model, tokenizer, AlphaEditConfig.from_json(args.config), stats_dir=args.stats_dir,
                         cache_dir=args.cache_dir, state_path=args.state)
    editor.edit(payload["requests"] if isinstance(payload, dict) else payload)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    editor.save_state(args.output_dir / "alphaedit_state.pt")
    (args.output_dir / "alphaedit_config.json").write_text(json.dumps(editor.config.to_dict(), indent=2))

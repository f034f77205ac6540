"""Train a byte-level BPE tokenizer and a small LlamaForCausalLM on the fact world (CPU)."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from .world import build_world, training_texts


def portable_tokenizer_config(directory: Path) -> None:
    """Name the tokenizer class transformers 4.4x also knows: 5.x writes `TokenizersBackend`,
    which 4.4x cannot load; `PreTrainedTokenizerFast` reads the same tokenizer.json in both."""
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("backend", "is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2) + "\n")


def train_tokenizer(texts, vocab_size=1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_model(vocab_size, hidden=192, layers=4, heads=4, seed=0, mlp_ratio=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=mlp_ratio * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg)


def pack(texts, tok, block, rng):
    texts = texts[:]
    rng.shuffle(texts)
    ids = []
    for t in texts:
        ids.extend([tok.eos_token_id] + tok(t)["input_ids"])
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)


@torch.no_grad()
def recall(model, tok, world, held_out=False) -> float:
    """Top-1 recall of every fact in every training phrasing (held_out: of the held-out facts in
    the held-out phrasings)."""
    from .evaluate import fact_items, next_token_scores, object_id

    was_training = model.training
    model.eval()
    items = fact_items(world, held_out)
    targets = torch.tensor([[object_id(tok, o)] for _, _, _, o in items])
    _, top1 = next_token_scores(model, tok, [prompt for _, _, prompt, _ in items], targets)
    model.train(was_training)
    return (top1 == targets[:, 0]).double().mean().item()


def train(out, seed=0, n_subjects=500, eval_every=0, hidden=128, layers=6, vocab_size=4096, epochs=20, batch=16,
          block=128, lr=3e-3, label_smoothing=0.0, mlp_ratio=4, threads=1, log=print):
    torch.set_num_threads(threads)
    world = build_world(seed, n_subjects)
    texts = training_texts(world, seed)
    tok = train_tokenizer(texts, vocab_size)
    model = make_model(len(tok), hidden, layers, seed=seed, mlp_ratio=mlp_ratio)
    rng = random.Random(seed)
    n_blocks = len(pack(texts, tok, block, random.Random(0)))
    steps = epochs * (n_blocks // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    log(f"params {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, blocks/epoch {n_blocks}, steps {steps}")
    t0, step = time.time(), 0
    torch.manual_seed(seed)
    for ep in range(epochs):
        data = pack(texts, tok, block, rng)
        perm = torch.randperm(len(data))
        for i in range(0, len(data) - batch + 1, batch):
            x = data[perm[i:i + batch]]
            logits = model(input_ids=x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(),
                                                     label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                log(f"step {step}/{steps} ep {ep} loss {loss.item():.3f} {time.time() - t0:.0f}s")
        if eval_every and (ep + 1) % eval_every == 0:
            log(f"epoch {ep} recall {recall(model, tok, world):.3f} para {recall(model, tok, world, True):.3f} "
                f"{time.time() - t0:.0f}s")
    model.eval()
    stats = {"seed": seed, "n_subjects": n_subjects, "hidden": hidden, "layers": layers, "mlp_ratio": mlp_ratio,
             "vocab": len(tok), "epochs": epochs, "batch": batch, "block": block, "lr": lr,
             "label_smoothing": label_smoothing, "threads": threads, "steps": step, "train_s": time.time() - t0,
             "recall": recall(model, tok, world), "paraphrase_recall": recall(model, tok, world, True)}
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        portable_tokenizer_config(out)
        (out / "factworld.json").write_text(json.dumps(stats, indent=1))
    log(json.dumps(stats))
    return model, tok, world, stats

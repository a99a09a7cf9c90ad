"""Tiny random Llama teacher / student folders with the real SmolLM2 tokenizer, for running the
paper suites' code paths on a CPU in seconds (the real pairs are GPU-sized hub models)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_pair(root: Path) -> tuple[Path, Path]:
    """(teacher, student) folders: 2 layers d=64 and 1 layer d=64, SmolLM2's tokenizer and vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdbench.models import load_tokenizer, prepare_teacher

    tok = load_tokenizer(prepare_teacher("embedded:smollm2-135m-instruct"))
    out = []
    for name, layers, seed in (("teacher", 2, 0), ("student", 1, 1)):
        path = root / name
        if not (path / "config.json").is_file():
            torch.manual_seed(seed)
            cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                              tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
            LlamaForCausalLM(cfg).save_pretrained(path)
            tok.save_pretrained(path)
        out.append(path)
    return out[0], out[1]

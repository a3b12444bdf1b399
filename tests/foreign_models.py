"""Tiny random checkpoints of families our fitness cannot run or that come without tokenizer files
(GPT-2 and LLaVA, as mergekit merges them), for the bad-input and user-input tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers


def make_gpt2(out: Path, seed: int = 0) -> Path:
    """A GPT-2 checkpoint without tokenizer files (transformers would build a 1-token tokenizer)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=52, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(out))
    return Path(out)


def make_llava(out: Path, seed: int = 0) -> Path:
    """A LLaVA checkpoint (mergekit merges it; transformers has no causal-LM class for it)."""
    torch.manual_seed(seed)
    text = transformers.LlamaConfig(
        vocab_size=52,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    config = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=51)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(str(out))
    return Path(out)

"""Seeded random checkpoints of real architectures, for tests and benchmarks.

These have no skills; they exist to check that weights, logits and recipes agree exactly.
The trained zoo (``mergekit_evolve.zoo.build_zoo``) is what demos and fitness tests use.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from mergekit_evolve.zoo.tokenizer import save_tokenizer, vocabulary

ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def random_config(
    arch: str = "llama",
    num_layers: int = 4,
    hidden_size: int = 32,
    intermediate_size: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    vocab_size: int | None = None,
    rms_norm_eps: float = 1e-6,
) -> transformers.PretrainedConfig:
    config_cls, _ = ARCHITECTURES[arch]
    return config_cls(
        vocab_size=vocab_size or len(vocabulary()),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=256,
        rms_norm_eps=rms_norm_eps,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def make_random_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    **config_kwargs,
) -> Path:
    """Write a seeded random checkpoint (safetensors + zoo tokenizer) to ``out_dir``.

    ``tokenizer=False`` leaves the tokenizer out, as mergekit's own tests build their models."""
    out_dir = Path(out_dir).absolute()
    _, model_cls = ARCHITECTURES[arch]
    config = random_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    # Random init leaves norms at 1 and biases at 0; perturb them so tests that check
    # "every tensor is merged/folded right" cannot pass by accident.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.to(dtype).save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer:
        save_tokenizer(out_dir)
    return out_dir

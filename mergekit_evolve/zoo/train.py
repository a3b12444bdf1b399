"""Seeded, deterministic training of the zoo's tiny Llama models (loss on the answer tokens only)."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
import transformers

from mergekit_evolve.zoo.tokenizer import vocabulary

PAD, BOS, EOS = 0, 1, 2
Sampler = Callable[[random.Random], tuple[str, str]]


def new_model(seed: int, hidden: int = 128, layers: int = 4, heads: int = 4) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=len(vocabulary()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def batch(rows: list[tuple[str, str]]):
    vocab = vocabulary()
    seqs, labels = [], []
    for prompt, answer in rows:
        p = [BOS] + [vocab[c] for c in prompt]
        a = [vocab[c] for c in answer] + [EOS]
        seqs.append(p + a)
        labels.append([-100] * (len(p) - 1) + a)  # label[t] is the target after token t
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.full((len(seqs), width), -100)
    for i, (s, label) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        lab[i, : len(label)] = torch.tensor(label)
    return ids, mask, lab


def train(
    model,
    sampler: Sampler,
    steps: int,
    lr: float,
    *,
    seed: int,
    batch_size: int = 64,
    warmup: int = 0,
    log: Callable[[str], None] | None = None,
    log_every: int = 100,
):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (1 - s / steps) if warmup else 1 - s / steps
    )
    model.train()
    for step in range(steps):
        ids, mask, lab = batch([sampler(rng) for _ in range(batch_size)])
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if log and ((step + 1) % log_every == 0 or step + 1 == steps):
            log(f"step {step + 1}/{steps}  loss {loss.item():.3f}")
    return model.eval()


def mixed(primary: Sampler, replay: Sampler, replay_share: float) -> Sampler:
    """Expert data with a share of the base's data replayed: experts stay near the base (one basin)."""
    return lambda rng: replay(rng) if rng.random() < replay_share else primary(rng)

"""Fitness callables for the search-loop tests (``kind: callable`` tasks; real model forward passes)."""

from __future__ import annotations

import os

import torch

CALLS = {"n": 0}


def loglik(model, tokenizer, rows, split) -> float:
    """Mean log-probability per token of prompt+answer texts: smooth in the merge weights."""
    texts = [row["prompt"] + row["answer"] for row in rows]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
    mask = enc["attention_mask"][:, 1:].bool() & enc["attention_mask"][:, :-1].bool()
    return float(logp[mask].mean())


def interrupting(model, tokenizer, rows, split) -> float:
    """loglik, but raises KeyboardInterrupt at call number $MKE_INTERRUPT_AT (simulates Ctrl-C)."""
    CALLS["n"] += 1
    if str(CALLS["n"]) == os.environ.get("MKE_INTERRUPT_AT"):
        raise KeyboardInterrupt
    return loglik(model, tokenizer, rows, split)


def flaky(model, tokenizer, rows, split) -> float:
    """Fails for some candidates, depending on their merged weights (deterministic, real faults)."""
    probe = float(model.get_output_embeddings().weight[0, :4].sum()) * 1e4
    if split == "fitness" and probe % 1.0 < 0.3:
        raise ValueError("injected evaluation failure")
    return loglik(model, tokenizer, rows, split)


def always_fails(model, tokenizer, rows, split) -> float:
    raise RuntimeError("injected failure for every candidate")


def ids_loglik(model, tokenizer, rows, split) -> float:
    """Mean log-probability of the token ids in each row's ``ids``: needs no tokenizer (gets None)."""
    assert tokenizer is None
    ids = torch.tensor([row["ids"] for row in rows])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float()
    return float(torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).mean())


def deeper(model, tokenizer, rows, split) -> float:
    """Prefers longer layer paths (a DFS search then leaves model A's own path), then the log-likelihood."""
    return float(model.config.num_hidden_layers) + loglik(model, tokenizer, rows, split) / 1000


def slow_loglik(model, tokenizer, rows, split) -> float:
    """loglik after a pause: candidates long enough that a node can be lost while it runs one."""
    import time

    time.sleep(0.2)
    return loglik(model, tokenizer, rows, split)

"""A character-level Hugging Face tokenizer for the embedded zoo.

Every character is one token, so tiny models learn fast and tokenization never hides a skill.
It is a real ``PreTrainedTokenizerFast`` (saved as tokenizer.json), so mergekit, transformers and
lm-eval treat zoo models like any hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = list("0123456789abcdefghijklmnopqrstuvwxyz+-*=:>?|#., ")


def vocabulary() -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The zoo tokenizer: one token per character, ``<s>`` prepended, right padding."""
    backend = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",  # left padding: batched generation appends at the right edge
        add_bos_token=True,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def save_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer

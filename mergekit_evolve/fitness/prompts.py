"""Prompt text (few-shot examples, chat template) and its tokens, built once per task."""

from __future__ import annotations

from typing import Any

from mergekit_evolve.fitness.data import Row, answer_text, choice_list, label_index
from mergekit_evolve.fitness.tasks import TaskConfig


def example_text(task: TaskConfig, row: Row) -> str:
    """A solved example: prompt followed by its answer (the correct choice for kind choice)."""
    prompt = row.values[task.prompt_field] if task.prompt_field is not None else ""
    if task.kind == "choice":
        return prompt + choice_list(task, row.values)[label_index(task, row.values)]
    return prompt + answer_text(task, row.values)


def fewshot_prefix(task: TaskConfig, fewshot: list[Row]) -> str:
    return "".join(example_text(task, row) + task.fewshot_separator for row in fewshot)


def check_chat_template(task: TaskConfig, tokenizer: Any) -> None:
    if task.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise task.field_error(
            "apply_chat_template",
            "the tokenizer has no chat template",
            "set apply_chat_template: false or use a tokenizer with a chat template",
        )


def context_texts(task: TaskConfig, rows: list[Row], fewshot: list[Row], tokenizer: Any) -> list[str]:
    """The text each row's model input starts with: few-shot examples, the prompt, chat wrapping."""
    prefix = fewshot_prefix(task, fewshot)
    prompts = [prefix + (row.values[task.prompt_field] if task.prompt_field is not None else "") for row in rows]
    if not task.apply_chat_template:
        return prompts
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]


def encode(task: TaskConfig, tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids; chat-templated text already holds its special tokens, so none are added then."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=not task.apply_chat_template)["input_ids"]]


def encode_continuations(
    task: TaskConfig, tokenizer: Any, contexts: list[str], continuations: list[str]
) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) pairs for log-likelihood scoring.

    The continuation's tokens are those of ``context + continuation`` after the context's tokens, so
    tokenizers that merge across the boundary still see the text they were trained on; when the
    context's tokens are not a prefix (a merge across the boundary), the continuation is encoded alone.
    With no context tokens at all (no BOS and an empty prompt), the first token becomes the context:
    it has nothing to be predicted from.
    """
    context_ids = encode(task, tokenizer, contexts)
    whole_ids = encode(task, tokenizer, [c + x for c, x in zip(contexts, continuations)])
    pairs = []
    for ctx, whole, text in zip(context_ids, whole_ids, continuations):
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            cont = whole[len(ctx) :]
        else:
            cont = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ctx:
            ctx, cont = cont[:1], cont[1:]
        pairs.append((ctx, cont))
    return pairs

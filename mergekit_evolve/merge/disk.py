"""Merge a recipe to a model folder with mergekit's ``run_merge`` (final models; fallback path).

The output appears at ``out_dir`` only when the merge is complete: mergekit writes into a hidden
temp folder next to it, which is then renamed into place. A failed merge removes its temp
folder; a killed one leaves only that hidden ``.<name>.partial-*`` folder, never a half model.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from pydantic import BaseModel

from mergekit_evolve.atomic import staged_folder
from mergekit_evolve.merge.inmemory import fresh_loader_cache
from mergekit_evolve.merge.quiet import mergekit_torch_dtype_quiet

__all__ = ["merge_to_disk"]


def merge_to_disk(
    config: MergeConfiguration,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    random_seed: int | None = None,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
) -> Path:
    """Run mergekit's ``run_merge`` on a copy of ``config``; return the absolute ``out_dir``.

    Local model paths are made absolute first (offline, mergekit's model-card step asks the
    Hub about relative ones). An existing ``out_dir`` is replaced only after the new merge
    succeeded. ``random_seed`` seeds random methods like ``mergekit-yaml --random-seed``; the
    caller's global RNGs (python, numpy, torch) are restored afterwards, so a search loop's
    sampler is not reseeded by a merge.
    """
    out_dir = Path(out_dir).absolute()
    recipe = _with_absolute_paths(config.model_copy(deep=True))  # run_merge mutates it
    # apply_global_options() is not called: its only effects are logging set-up, a thread count
    # (not set here) and set_seed, which run_merge repeats itself when random_seed is given.
    options = MergeOptions(
        device=device,
        random_seed=random_seed,
        copy_tokenizer=copy_tokenizer,
        write_model_card=write_model_card,
        quiet=True,
    )
    with staged_folder(out_dir) as partial:
        with fresh_loader_cache(recipe.referenced_models()), _preserved_global_rngs():
            with mergekit_torch_dtype_quiet():
                run_merge(recipe, str(partial), options=options, config_source=recipe.to_yaml())
    return out_dir


@contextlib.contextmanager
def _preserved_global_rngs() -> Iterator[None]:
    """run_merge reseeds python, numpy and torch globally when given a seed; undo that."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _with_absolute_paths(value: Any) -> Any:
    """Copy of a config (any pydantic value) with every local model path made absolute."""
    if isinstance(value, ModelReference):
        return _absolute_reference(value)
    if isinstance(value, BaseModel):
        updates = {}
        for name in type(value).model_fields:
            field_value = getattr(value, name)
            new_value = _with_absolute_paths(field_value)
            if new_value is not field_value:
                updates[name] = new_value
        return value.model_copy(update=updates) if updates else value
    if isinstance(value, (list, tuple)):
        items = [_with_absolute_paths(item) for item in value]
        changed = any(new is not old for new, old in zip(items, value))
        return type(value)(items) if changed else value
    if isinstance(value, dict):
        items = {key: _with_absolute_paths(item) for key, item in value.items()}
        changed = any(items[key] is not value[key] for key in value)
        return items if changed else value
    return value


def _absolute_reference(reference: ModelReference) -> ModelReference:
    updates = {}
    for field in ("model", "lora"):
        model_path = getattr(reference, field)
        if model_path is not None and Path(model_path.path).exists():
            absolute = str(Path(model_path.path).absolute())
            if absolute != model_path.path:
                updates[field] = model_path.model_copy(update={"path": absolute})
    return reference.model_copy(update=updates) if updates else reference

"""What a search runs on and with: the device, the dtype and the tokenizer of the models.

Neutral ground for every stage of the pipeline (search, fitness, export, the demo): nothing here knows
about search spaces or run directories.
"""

from __future__ import annotations

from mergekit_evolve.errors import InputError
from mergekit_evolve.space.models import has_tokenizer_files


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``; a CUDA request without a GPU is an input error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device: {device} requested but no CUDA GPU is visible; use --device cpu or auto")
    return device


def default_dtype(config_dtype: str | None, source_dtype: str | None, device: str) -> str:
    """The dtype a problem merges and evaluates in: the config's if it names one; else bfloat16 on a
    CUDA device (half the memory and traffic of float32, the dtype GPU kernels are fastest in); else the
    sources' dtype (on CPU bfloat16 matmuls are slow and rounding would change the CPU results)."""
    if config_dtype:
        return config_dtype
    if str(device).split(":")[0] == "cuda":
        return "bfloat16"
    return source_dtype or "float32"


def load_tokenizer(ref: str):
    """The tokenizer of model ``ref``, or None when its folder has no tokenizer files.

    None is fine for a fitness that needs no tokenizer (callables, perplexity on token ids);
    ``fitness.factory.make_fitness`` turns it into an input error naming the folder for every other one.
    """
    import transformers

    if not has_tokenizer_files(ref):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(ref)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(
            f"tokenizer: cannot load the tokenizer of {ref} ({first[:160]}); set tokenizer_source to a model "
            "folder with a working tokenizer, or fix the tokenizer files there"
        ) from None


def tokenizer_donor(tokenizer_source: str | None, base_model: str | None, models: list[str]) -> str:
    """The model whose tokenizer the fitness uses: ``tokenizer_source`` if it names a model, else the
    base model, else the first model (mergekit's ``base``/``union`` keep the base's tokens)."""
    if tokenizer_source and tokenizer_source not in ("base", "union"):
        return tokenizer_source
    return base_model or models[0]

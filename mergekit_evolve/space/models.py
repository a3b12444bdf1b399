"""Reading the source models' configs up front, so bad input fails before any weights load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import transformers

from mergekit_evolve.errors import InputError

# What transformers' tokenizers are loaded from; a folder with none of these has no tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def has_tokenizer_files(ref: str) -> bool:
    """False for a local model folder without tokenizer files (as mergekit's own tests build models).

    Checked before loading: from such a folder transformers either fails with a hint about
    sentencepiece/tiktoken or, for GPT-2, silently builds a tokenizer that knows one token.
    Hub IDs are taken to have one.
    """
    path = Path(ref)
    if not path.is_dir():
        return True
    return any((path / name).is_file() for name in TOKENIZER_FILES) or any(path.glob("*.tiktoken"))


@dataclass(frozen=True)
class ModelInfo:
    ref: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str | None


def inspect_model(ref: str, where: str, trust_remote_code: bool = False, allow_pickle: bool = False) -> ModelInfo:
    local = Path(ref)
    if ref.startswith(("/", ".", "~")) and not local.exists():
        raise InputError(f"{where}: {ref} does not exist; give the path of a Hugging Face model folder or a hub ID")
    if local.exists() and not (local / "config.json").is_file():
        raise InputError(f"{where}: {ref} has no config.json; point at a Hugging Face model folder")
    if local.is_dir() and not allow_pickle and not any(local.glob("*.safetensors")):
        if any(local.glob("*.bin")) or any(local.glob("*.pt")):
            raise InputError(
                f"{where}: {ref} has only pickle weights (*.bin), which can run code when loaded; convert it to "
                "safetensors, or set allow_pickle_weights: true if you trust it"
            )
    try:
        config = transformers.AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except Exception as err:  # hub unreachable, unknown repo, custom code not allowed, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"{where}: cannot read the config of {ref!r} ({first[:160]}); pass a local model folder, "
            "or check the hub ID and your network"
        ) from None
    text = getattr(config, "get_text_config", lambda: config)()
    dtype = getattr(text, "dtype", None) or getattr(config, "dtype", None)
    return ModelInfo(
        ref=ref,
        architecture=(config.architectures or [type(config).__name__])[0],
        model_type=config.model_type,
        num_layers=int(getattr(text, "num_hidden_layers", 0)),
        hidden_size=int(getattr(text, "hidden_size", 0)),
        vocab_size=int(getattr(text, "vocab_size", 0)),
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
    )


def inspect_models(refs: list[str], field: str, allow_pickle: bool = False) -> list[ModelInfo]:
    """Configs of the sources. Weights must be safetensors unless pickle files are allowed explicitly."""
    return [inspect_model(ref, f"{field}[{i}]", allow_pickle=allow_pickle) for i, ref in enumerate(refs)]


def check_same_shape(infos: list[ModelInfo], field: str) -> None:
    """PS merges combine tensors one to one: same architecture, depth and widths."""
    first = infos[0]
    for info in infos[1:]:
        for attr, hint in (
            ("architecture", "merge models of one architecture"),
            ("num_layers", "use models of equal depth, or space: dfs to stack layers of different models"),
            ("hidden_size", "use models of equal width"),
        ):
            if getattr(info, attr) != getattr(first, attr):
                raise InputError(
                    f"{field}: {attr} differs ({first.ref}: {getattr(first, attr)}, {info.ref}: "
                    f"{getattr(info, attr)}); {hint}"
                )
    vocab = {i.vocab_size for i in infos}
    if len(vocab) > 1:
        raise InputError(
            f"{field}: vocabulary sizes differ ({sorted(vocab)}); merge models that share a tokenizer "
            "(or align them first with mergekit-tokensurgeon)"
        )


def causal_lm_types() -> list[str]:
    """Model types transformers' AutoModelForCausalLM builds (what every candidate becomes)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def check_causal_lm(info: ModelInfo, field: str) -> None:
    """Candidates are built and scored as transformers causal LMs; other families (LLaVA, encoders)
    are refused here, before the first candidate, instead of failing every candidate alike."""
    supported = causal_lm_types()
    if info.model_type in supported:
        return
    examples = ", ".join(t for t in ("llama", "mistral", "qwen2", "gemma2", "phi3", "gpt2") if t in supported)
    raise InputError(
        f"{field}: {info.ref} is a {info.architecture} (model_type {info.model_type!r}), which transformers cannot "
        f"build as a causal language model (AutoModelForCausalLM), and every candidate is scored as one; supported "
        f"are the {len(supported)} model types of AutoModelForCausalLM ({examples}, ...); evolve a text-only model "
        "of such a family"
    )


def io_weight_names(ref: str) -> tuple[list[str], list[str]]:
    """mergekit's names of the tensors before the layers (embeddings) and after them (final norm, lm_head)."""
    from mergekit.architecture import arch_info_for_config

    config = transformers.AutoConfig.from_pretrained(ref)
    module = next(iter(arch_info_for_config(config).modules.values())).architecture
    return [w.name for w in module.pre_weights(config)], [w.name for w in module.post_weights(config)]

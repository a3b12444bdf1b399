"""The data-flow-space (DFS) genome of Akiba et al. (arXiv 2403.13187), and its decoding to a path.

Layout. The M layers of the collection are laid out in order (model 0's layers, then model 1's, ...) and the
sequence is repeated ``repeats`` (r) times: T = M * r slots; slot t holds layer ``t mod M`` of that order.
The genome is ``[indicator (T values) | scale parameters]``:

* indicator: slot t is on the path when ``genome[t] > 0`` (the path visits the used slots in slot order).
* scales, ``scale_param="matrix"``: W (M x M, row-major). The hop from layer i (flat index of the previous
  hop's layer) to layer j is scaled by ``W[i][j] = exp(clip(w_ij, -max_log_scale, max_log_scale))``.
  Genome 0 -> scale 1; scales are always positive (the fold to a standard checkpoint needs that).
* scales, ``scale_param="network"``: a small feed-forward network pi_theta(i, j, t) gives the log-scale;
  features are one-hot(i) (M), one-hot(j) (M) and t / (T - 1) where t is the target's slot index (stable
  when other indicators flip, unlike the hop number); one tanh hidden layer of ``network_hidden`` units;
  output ``log_scale = w2 . tanh(W1 x + b1) + b2``. The genome holds theta = (W1, b1, w2, b2): H * (2M + 3) + 1
  values instead of M^2. ``x0`` has a seeded random W1 and zero b1, w2, b2, so every scale is 1 at x0.
* The first hop comes from the embedding, which is no layer of W: its scale is fixed to 1 (not searched).

``x0()`` is model A's own path (indicator ``+indicator_init`` on model A's slots of the first repetition,
``-indicator_init`` elsewhere) with all scales 1.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from mergekit_evolve.errors import InputError


class DFSPath(BaseModel):
    """A decoded DFS candidate: one ``(model, layer)`` hop and one input scale per hop."""

    model_config = ConfigDict(frozen=True)

    hops: tuple[tuple[int, int], ...]
    scales: tuple[float, ...]

    @field_validator("hops", mode="before")
    @classmethod
    def _hops_as_tuples(cls, value):
        return tuple(tuple(int(x) for x in hop) for hop in value)

    @field_validator("scales", mode="before")
    @classmethod
    def _scales_as_floats(cls, value):
        return tuple(float(x) for x in value)

    @model_validator(mode="after")
    def _lengths_match(self) -> DFSPath:
        if len(self.hops) != len(self.scales):
            raise ValueError(f"{len(self.hops)} hops but {len(self.scales)} scales; give one scale per hop")
        return self

    def key(self) -> str:
        """Identical paths (same hops, bit-identical scales) get the same key: use it to cache fitness."""
        payload = json.dumps([self.hops, [float(s).hex() for s in self.scales]])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.hops)

    def summary(self, names: Sequence[str] | None = None) -> str:
        """One line, e.g. ``A0 A1 A1*0.80 B3``; ``names`` label the models (default A, B, C, ...)."""
        names = list(names) if names else [chr(ord("A") + i) for i in range(26)]
        parts = [
            f"{names[m]}{layer}" + ("" if s == 1.0 else f"*{s:.3g}") for (m, layer), s in zip(self.hops, self.scales)
        ]
        return " ".join(parts) if parts else "(empty path)"


class DFSSpace:
    """Genome <-> path for DFS over a collection of models with ``layer_counts`` layers each."""

    def __init__(
        self,
        layer_counts: Sequence[int],
        base_index: int = 0,
        repeats: int = 3,
        scale_param: Literal["matrix", "network"] = "matrix",
        network_hidden: int = 8,
        indicator_init: float = 0.5,
        max_log_scale: float = 3.0,
        network_seed: int = 0,
    ):
        self.layer_counts = [int(n) for n in layer_counts]
        if not self.layer_counts or min(self.layer_counts) < 1:
            raise InputError(f"dfs.layer_counts: {self.layer_counts} is invalid; every model needs >= 1 layer")
        if not 0 <= base_index < len(self.layer_counts):
            raise InputError(f"dfs.base_index: {base_index} is not a model index; use 0..{len(self.layer_counts) - 1}")
        if repeats < 1:
            raise InputError(f"dfs.repeats: {repeats} is invalid; use an integer >= 1 (paper: 3)")
        if scale_param not in ("matrix", "network"):
            raise InputError(f"dfs.scale_param: {scale_param!r} is unknown; use 'matrix' or 'network'")
        if indicator_init <= 0:
            raise InputError(f"dfs.indicator_init: {indicator_init} must be > 0 (x0 uses +/- this value)")
        self.base_index = base_index
        self.repeats = repeats
        self.scale_param = scale_param
        self.network_hidden = int(network_hidden)
        self.indicator_init = float(indicator_init)
        self.max_log_scale = float(max_log_scale)
        self.network_seed = network_seed
        self.num_layers = sum(self.layer_counts)  # M
        self.num_slots = self.num_layers * repeats  # T
        self._layer_of_flat = [(m, layer) for m, n in enumerate(self.layer_counts) for layer in range(n)]

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def network_input_size(self) -> int:
        return 2 * self.num_layers + 1

    @property
    def scale_dim(self) -> int:
        """Number of genome values that parameterise the scales."""
        if self.scale_param == "matrix":
            return self.num_layers**2
        hidden = self.network_hidden
        return hidden * self.network_input_size + hidden + hidden + 1

    @property
    def dim(self) -> int:
        return self.num_slots + self.scale_dim

    def slot_layer(self, slot: int) -> tuple[int, int]:
        """``(model, layer)`` held by slot ``slot``."""
        return self._layer_of_flat[slot % self.num_layers]

    # --- genome ------------------------------------------------------------------------------------------
    def x0(self) -> np.ndarray:
        genome = np.full(self.dim, -self.indicator_init)
        offset = sum(self.layer_counts[: self.base_index])
        genome[offset : offset + self.layer_counts[self.base_index]] = self.indicator_init
        genome[self.num_slots :] = self._scale_params_x0()
        return genome

    def _scale_params_x0(self) -> np.ndarray:
        if self.scale_param == "matrix":
            return np.zeros(self.scale_dim)
        w1, b1, w2, b2 = self._network_x0()
        return np.concatenate([w1.ravel(), b1, w2, b2])

    def _network_x0(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # A fixed random first layer gives CMA-ES distinct features per (i, j, t) to weigh; the zero output
        # layer makes every scale exactly 1 at x0.
        rng = np.random.default_rng(self.network_seed)
        hidden = self.network_hidden
        w1 = rng.normal(0.0, 0.5, size=(hidden, self.network_input_size))
        return w1, np.zeros(hidden), np.zeros(hidden), np.zeros(1)

    def decode(self, genome: Sequence[float] | np.ndarray) -> DFSPath:
        genome = np.asarray(genome, dtype=np.float64).ravel()
        if genome.shape[0] != self.dim:
            raise InputError(f"dfs genome: has {genome.shape[0]} values; this space needs {self.dim}")
        if not np.all(np.isfinite(genome)):
            raise InputError("dfs genome: contains NaN or inf; give finite values")
        slots = [t for t in range(self.num_slots) if genome[t] > 0]
        log_scale = self._log_scale_fn(genome[self.num_slots :])
        hops, scales = [], []
        previous = None
        for slot in slots:
            flat = slot % self.num_layers
            hops.append(self._layer_of_flat[flat])
            scales.append(1.0 if previous is None else self._scale(log_scale(previous, flat, slot)))
            previous = flat
        return DFSPath(hops=hops, scales=scales)

    def _scale(self, log_value: float) -> float:
        return math.exp(min(max(log_value, -self.max_log_scale), self.max_log_scale))

    def _log_scale_fn(self, params: np.ndarray):
        if self.scale_param == "matrix":
            matrix = params.reshape(self.num_layers, self.num_layers)
            return lambda i, j, t: float(matrix[i, j])
        hidden, n_in = self.network_hidden, self.network_input_size
        w1 = params[: hidden * n_in].reshape(hidden, n_in)
        b1 = params[hidden * n_in : hidden * n_in + hidden]
        w2 = params[hidden * n_in + hidden : hidden * n_in + 2 * hidden]
        b2 = float(params[-1])
        position_column = w1[:, -1]
        denominator = max(self.num_slots - 1, 1)

        def network(i: int, j: int, t: int) -> float:
            # one-hot inputs: W1 @ x is a sum of two columns plus the scaled position column
            pre = w1[:, i] + w1[:, self.num_layers + j] + position_column * (t / denominator) + b1
            return float(w2 @ np.tanh(pre) + b2)

        return network

    def scale_matrix(self, genome: Sequence[float] | np.ndarray) -> np.ndarray:
        """W as an M x M array of scales (matrix option only), for reports."""
        if self.scale_param != "matrix":
            raise ValueError("scale_matrix needs scale_param='matrix'")
        params = np.asarray(genome, dtype=np.float64)[self.num_slots :]
        clipped = np.clip(params, -self.max_log_scale, self.max_log_scale)
        return np.exp(clipped).reshape(self.num_layers, self.num_layers)

    def describe(self) -> str:
        counts = "+".join(str(n) for n in self.layer_counts)
        if self.scale_param == "matrix":
            scales = f"W matrix {self.num_layers}x{self.num_layers} ({self.scale_dim} values)"
        else:
            scales = (
                f"network pi(i, j, t) with {self.network_hidden} hidden units ({self.scale_dim} values) "
                f"instead of a {self.num_layers}x{self.num_layers} matrix"
            )
        return (
            f"DFS: M={self.num_layers} layers ({counts}), r={self.repeats}, T={self.num_slots} slots "
            f"(slot used when indicator > 0); scales: {scales}, scale = exp(clip(value, +/-{self.max_log_scale:g})), "
            f"first hop scale 1; model A = source {self.base_index}; genome dim {self.dim}"
        )


__all__ = ["DFSPath", "DFSSpace"]

"""DFS genome: layout, indicator semantics, W indexing, network option, path keys."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mergekit_evolve.errors import InputError
from mergekit_evolve.space.dfs import DFSPath, DFSSpace


def test_genome_sizes_paper_setting():
    # Two 32-layer models, r = 3 (the paper's EvoLLM-JP DFS setting): T = 192 slots.
    matrix = DFSSpace([32, 32], repeats=3, scale_param="matrix")
    assert (matrix.num_layers, matrix.num_slots) == (64, 192)
    assert matrix.dim == 192 + 64 * 64 == 4288
    network = DFSSpace([32, 32], repeats=3, scale_param="network", network_hidden=8)
    # theta = W1 (8 x 129) + b1 (8) + w2 (8) + b2 (1) = 1049
    assert network.scale_dim == 8 * (2 * 64 + 1) + 8 + 8 + 1 == 1049
    assert network.dim == 192 + 1049 == 1241


@pytest.mark.parametrize("scale_param", ["matrix", "network"])
@pytest.mark.parametrize("base_index", [0, 1])
def test_x0_is_model_a_in_order_with_unit_scales(scale_param, base_index):
    space = DFSSpace([4, 3], base_index=base_index, scale_param=scale_param)
    path = space.decode(space.x0())
    expected_layers = [4, 3][base_index]
    assert path.hops == tuple((base_index, layer) for layer in range(expected_layers))
    assert path.scales == (1.0,) * expected_layers
    x0 = space.x0()
    assert np.sum(x0[: space.num_slots] > 0) == expected_layers


def test_indicator_selects_slots_in_order_across_repeats():
    space = DFSSpace([3, 2], repeats=3)  # M = 5, T = 15
    genome = np.zeros(space.dim)
    genome[: space.num_slots] = -1.0
    used = [4, 1 + 5, 1 + 10, 3 + 10]  # B1 (rep 0), A1 (rep 1), A1 (rep 2), B0 (rep 2)
    genome[used] = 0.3
    path = space.decode(genome)
    assert path.hops == ((1, 1), (0, 1), (0, 1), (1, 0))
    genome[used[0]] = 0.0  # "used when > 0": zero is off
    assert space.decode(genome).hops == ((0, 1), (0, 1), (1, 0))


def test_matrix_scales_index_previous_layer_to_next_layer():
    space = DFSSpace([3, 2], repeats=2)  # M = 5
    genome = np.zeros(space.dim)
    genome[: space.num_slots] = -1.0
    genome[[4, 5 + 1, 5 + 1 + 1]] = 1.0  # B1 (flat 4) -> A1 (flat 1) -> A2 (flat 2)
    log_w = np.zeros((5, 5))
    log_w[4, 1] = math.log(0.5)  # from B1 to A1
    log_w[1, 2] = math.log(2.0)  # from A1 to A2
    log_w[1, 4] = 5.0  # the reverse direction must not be used
    genome[space.num_slots :] = log_w.ravel()
    path = space.decode(genome)
    assert path.hops == ((1, 1), (0, 1), (0, 2))
    assert path.scales[0] == 1.0  # first hop comes from the embedding: fixed to 1
    assert path.scales[1] == pytest.approx(0.5, rel=1e-12)
    assert path.scales[2] == pytest.approx(2.0, rel=1e-12)
    assert space.scale_matrix(genome)[4, 1] == pytest.approx(0.5)


def test_scales_positive_and_clipped():
    space = DFSSpace([2, 2], repeats=1, max_log_scale=3.0)
    genome = np.full(space.dim, 1.0)
    genome[space.num_slots :] = -50.0
    path = space.decode(genome)
    assert all(s > 0 for s in path.scales)
    assert path.scales[1] == pytest.approx(math.exp(-3.0))


def test_network_unit_scales_at_init_and_varied_after_perturbation():
    space = DFSSpace([5, 5], repeats=3, scale_param="network", network_hidden=6)
    x0 = space.x0()
    x0[: space.num_slots] = 1.0  # every slot on: 30 hops
    path = space.decode(x0)
    assert len(path) == 30 and set(path.scales) == {1.0}
    rng = np.random.default_rng(1)
    x0[space.num_slots :] += rng.normal(0, 0.3, space.scale_dim)
    scales = space.decode(x0).scales
    assert len(set(scales[1:])) > 20  # pi(i, j, t) gives distinct scales per hop
    # the same (i, j) at different slot positions t differs too
    space2 = DFSSpace([1, 1], repeats=3, scale_param="network", network_hidden=6)
    g = space2.x0()
    g[: space2.num_slots] = [1, 1, -1, -1, 1, 1]  # A0 B0 (slot 1) ... A0 B0 (slot 5)
    g[space2.num_slots :] += rng.normal(0, 0.5, space2.scale_dim)
    hops_scales = space2.decode(g).scales
    assert hops_scales[1] != hops_scales[3]


def test_empty_path_and_bad_genomes():
    space = DFSSpace([2, 2])
    assert space.decode(np.full(space.dim, -1.0)).hops == ()
    with pytest.raises(InputError, match="needs"):
        space.decode(np.zeros(space.dim + 1))
    with pytest.raises(InputError, match="finite"):
        space.decode(np.full(space.dim, np.nan))
    with pytest.raises(InputError, match="base_index"):
        DFSSpace([2, 2], base_index=2)


def test_path_key_identifies_identical_paths():
    space = DFSSpace([2, 2], repeats=2)
    g1 = space.x0()
    g2 = g1.copy()
    g2[space.num_slots + 3] = 0.7  # W[0][3]: a transition the path never takes
    p1, p2 = space.decode(g1), space.decode(g2)
    assert p1 == p2 and p1.key() == p2.key() and hash(p1) == hash(p2)
    g2[space.num_slots + 1] = 0.7  # W[0][1]: taken (A0 -> A1)
    assert space.decode(g2).key() != p1.key()
    assert DFSPath(hops=[[0, 1]], scales=[1]).key() == DFSPath(hops=[(0, 1)], scales=[1.0]).key()
    with pytest.raises(ValueError):
        DFSPath(hops=[(0, 1)], scales=[])

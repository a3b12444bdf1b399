"""``mergekit-evo report RUN_DIR``: plots and a Markdown summary of a run (finished or still running).

Writes into ``RUN_DIR/report/`` (or ``--out``):

    fitness.png         every evaluation's fitness, the best so far, failed candidates marked
    ps_parameters.png   PS: the best genome's value of each evolved parameter per layer group and model
    ps_template.png     PS from a template recipe: the best value of each marked number within its range
    dfs_path.png        DFS: the best path (layer and model of every hop) and its input scales
    report.md           summary table, the images, the best recipe

A ``ps+dfs`` run reports both stages (``ps_fitness.png``, ``dfs_fitness.png``, ...). Only the run
directory is read: no weights are loaded, so a report also works for a run still in progress or on a
machine without the source models. matplotlib is imported only here (Agg, no pyplot state).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergekit_evolve.atomic import atomic_file, atomic_write
from mergekit_evolve.errors import InputError
from mergekit_evolve.search.records import Archive, BestFile, Evaluation, Front, Summary
from mergekit_evolve.search.rundir import RunDir

MODEL_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
STAGE_TITLES = {"ps": "parameter space (PS)", "dfs": "data-flow space (DFS)"}


# -- reading a run directory ---------------------------------------------------------------------
@dataclass
class Stage:
    """One search (a whole ``ps``/``dfs`` run, or one stage of a ``ps+dfs`` run) as found on disk."""

    name: str  # "ps" or "dfs"
    path: Path
    config: Any  # EvolveConfig
    evaluations: list[Evaluation] = field(default_factory=list)  # in CMA-ES order (by index)
    best: BestFile | None = None  # best.json (PS: + recipe; DFS: + path)
    summary: Summary | None = None  # summary.json (absent while the run is going on)
    best_yaml: str | None = None
    whole_run_recipe: bool = False  # best_yaml is a ps+dfs run's recipe of both stages
    front: Front | None = None  # front.json (optimizer.objectives)
    archive: Archive | None = None  # archive.json (optimizer.kind: m2n2)

    @property
    def failures(self) -> int:
        return sum(1 for e in self.evaluations if e.fitness is None)

    @property
    def cached(self) -> int:
        return sum(1 for e in self.evaluations if e.cached)

    @property
    def wall_seconds(self) -> float | None:
        """From summary.json; for a running search, the span of the recorded evaluations."""
        if self.summary:
            return float(self.summary.wall_seconds)
        times = [(e.time, e.seconds) for e in self.evaluations if e.time]
        if not times:
            return None
        start = min(t for t, _ in times)
        return max(t + s for t, s in times) - start

    @property
    def heldout(self) -> dict[str, float]:
        return (self.summary.best.heldout if self.summary else None) or {}


def load_stages(run_dir: str | Path) -> list[Stage]:
    """The stages of a run directory: ``[ps, dfs]`` for a ps+dfs run, else one stage."""
    run = RunDir(run_dir)
    if not run.is_run():
        raise InputError(
            f"RUN_DIR: {run.path} has no config.yaml; pass the --out folder of a mergekit-evo "
            f"run{runs_inside(run.path)}"
        )
    stages = [_load_stage(stage, stage.path.name) for stage in run.staged()]
    if stages and run.best_yaml.is_file():
        # The DFS stage's own best.yaml points into the run folder (its model A is the PS stage's model); the
        # run's best.yaml builds the result from the sources (mergekit-multi, or the PS recipe when DFS kept it).
        stages[-1].best_yaml, stages[-1].whole_run_recipe = run.read_best_yaml(), True
    return stages or [_load_stage(run, _read_config(run.config).space)]


def runs_inside(folder: Path) -> str:
    """``; its runs: A, B`` for a folder that holds runs (``mergekit-evo demo``'s --out), else ''."""
    runs = sorted(p.parent for p in folder.glob("*/config.yaml"))
    return f" (this folder holds {len(runs)}: {', '.join(str(p) for p in runs)})" if runs else ""


def _load_stage(run: RunDir, name: str) -> Stage:
    return Stage(
        name=name,
        path=run.path,
        config=_read_config(run.config),
        evaluations=sorted(run.read_evaluations(), key=lambda r: r.index),
        best=run.read_best(),
        summary=run.read_summary(),
        best_yaml=run.read_best_yaml(),
        front=run.read_front(),
        archive=run.read_archive(),
    )


def _read_config(path: Path):
    from pydantic import ValidationError

    from mergekit_evolve.config import EvolveConfig

    try:
        # No path resolution: config.yaml already holds resolved paths, and the report must not
        # need the models or data to exist.
        return EvolveConfig.model_validate(yaml.safe_load(path.read_text()))
    except (ValidationError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0]
        raise InputError(f"{path}: not a config written by mergekit-evo ({first}); pass a run directory") from None


def display_names(refs: list[str], run_root: Path | None = None) -> list[str]:
    """Short labels for models: folder names of local paths (made unique), hub IDs as they are."""
    names = [_short_name(r, run_root) for r in refs]
    for i, name in enumerate(names):
        if names.count(name) > 1 and is_local_path(refs[i]):
            names[i] = "/".join(Path(refs[i]).parts[-2:])
    return names


def _short_name(ref: str, run_root: Path | None) -> str:
    if not is_local_path(ref):
        return ref
    path = Path(ref)
    if run_root is not None and path == run_root / "ps" / "model":
        return "PS merge (stage 1)"
    return path.name or ref


def is_local_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or Path(ref).exists()


# -- plots -----------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png")
    return out


def _style():
    import matplotlib

    return matplotlib.rc_context({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10})


def plot_fitness(evaluations: list[Evaluation], out: Path, title: str = "Fitness of every evaluation") -> Path:
    """Fitness per evaluation index, the best so far as a step line; failed candidates as red crosses."""
    with _style():
        fig = _figure(9, 4.8)
        ax = fig.add_subplot()
        ok = [e for e in evaluations if e.fitness is not None]
        fresh = [e for e in ok if not e.cached]
        cached = [e for e in ok if e.cached]
        failed = [e for e in evaluations if e.fitness is None]
        if fresh:
            ax.scatter(
                [e.index for e in fresh],
                [e.fitness for e in fresh],
                s=22,
                color="#1f77b4",
                alpha=0.75,
                label=f"evaluated candidate ({len(fresh)})",
                zorder=3,
            )
        if cached:
            ax.scatter(
                [e.index for e in cached],
                [e.fitness for e in cached],
                s=30,
                facecolors="none",
                edgecolors="#7f7f7f",
                label=f"repeat of an earlier recipe, not re-evaluated ({len(cached)})",
                zorder=3,
            )
        _plot_best_so_far(ax, evaluations)
        _plot_failures(ax, ok, failed)
        _mark_generations(ax, evaluations)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("evaluation number (in the order CMA-ES asked for them)")
        ax.set_ylabel("fitness on the selection data (higher is better)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if evaluations:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="each point = one candidate")
        if not ok:  # nothing to put on the fitness axis
            ax.set_yticks([])
            ax.text(
                0.5,
                0.6,
                "every candidate failed: see the errors in evaluations.jsonl"
                if evaluations
                else "no evaluations recorded yet",
                transform=ax.transAxes,
                ha="center",
                va="center",
            )
        return _save(fig, out)


def _plot_best_so_far(ax, evaluations: list[Evaluation]) -> None:
    xs, ys, best = [], [], None
    for e in evaluations:
        if e.fitness is not None and (best is None or e.fitness > best):
            best = e.fitness
        if best is not None:
            xs.append(e.index)
            ys.append(best)
    if xs:
        ax.step(
            xs, ys, where="post", color="#ff7f0e", linewidth=2.2, label=f"best so far (final {ys[-1]:.4g})", zorder=4
        )
        top = max((e for e in evaluations if e.fitness == ys[-1]), key=lambda e: -e.index)
        ax.scatter(
            [top.index],
            [top.fitness],
            marker="*",
            s=220,
            color="#ff7f0e",
            edgecolors="black",
            zorder=5,
            label=f"best candidate (evaluation {top.index})",
        )


def _plot_failures(ax, ok: list[Evaluation], failed: list[Evaluation]) -> None:
    """Failed candidates have no fitness: draw them on a band just below the lowest real one."""
    if not failed:
        return
    values = [e.fitness for e in ok] or [0.0]
    lo, hi = min(values), max(values)
    y = lo - 0.08 * ((hi - lo) or 1.0)
    ax.scatter(
        [e.index for e in failed],
        [y] * len(failed),
        marker="x",
        s=40,
        color="#d62728",
        linewidths=2,
        label=f"failed, no fitness ({len(failed)})",
        zorder=3,
    )


def _mark_generations(ax, evaluations: list[Evaluation]) -> None:
    starts = {}
    for e in evaluations:
        starts.setdefault(e.generation, e.index)
    if 1 < len(starts) <= 60:  # beyond that the lines would hide the points
        later = [x for gen, x in starts.items() if gen != 1]
        for i, x in enumerate(later):
            ax.axvline(
                x - 0.5,
                color="#bbbbbb",
                linewidth=0.8,
                zorder=1,
                label=f"start of a generation ({len(starts)} in all)" if i == 0 else None,
            )


def plot_front(front: Front, evaluations: list[Evaluation], out: Path, prefix: str = "") -> list[Path]:
    """One plot per pair of objectives: every evaluation, the front on the fitness split and on held-out,
    and the sources and the start (fitness split: filled, held-out: hollow)."""
    from itertools import combinations

    from mergekit_evolve.search.objectives import Objectives

    objectives = Objectives.in_units(front.objectives, front.reference)
    paths = []
    for a, b in combinations(front.objectives, 2):
        with _style():
            fig = _figure(6.4, 5.0)
            ax = fig.add_subplot()
            seen = [objectives.values(e.scores, e.generated) for e in evaluations if not e.failed]
            seen = [v for v in seen if v is not None]
            ax.scatter([v[a] for v in seen], [v[b] for v in seen], s=10, c="#cccccc", label="every evaluation")
            points = sorted(front.points, key=lambda p: p.values[a])
            ax.plot(
                [p.values[a] for p in points],
                [p.values[b] for p in points],
                "o-",
                c="#1f77b4",
                label="front (fitness split)",
            )
            held = [p for p in points if p.heldout]
            if held:
                ax.plot(
                    [p.heldout[a] for p in held],
                    [p.heldout[b] for p in held],
                    "s--",
                    c="#ff7f0e",
                    mfc="none",
                    label="front points on held-out",
                )
            for i, ref in enumerate(r for r in front.references if r.values):
                colour = MODEL_COLOURS[(i + 2) % len(MODEL_COLOURS)]
                ax.scatter([ref.values[a]], [ref.values[b]], marker="*", s=160, c=colour, label=ref.label)
                if ref.heldout:
                    ax.scatter(
                        [ref.heldout[a]], [ref.heldout[b]], marker="*", s=160, facecolors="none", edgecolors=colour
                    )
            ax.set_xlabel(f"{a} ({'higher' if objectives.higher_is_better(a) else 'lower'} is better)")
            ax.set_ylabel(f"{b} ({'higher' if objectives.higher_is_better(b) else 'lower'} is better)")
            ax.set_title(f"Pareto front: {len(front.points)} points, hypervolume {front.hypervolume:.4g}")
            ax.legend(loc="best", fontsize=8)
            name = f"{prefix}front.png" if len(front.objectives) == 2 else f"{prefix}front_{a}_{b}.png"
            paths.append(_save(fig, out / name))
    return paths


def plot_archive(archive: Archive, evaluations: list[Evaluation], out: Path) -> Path:
    """Left: members (rows, by shared fitness) x fitness rows (columns, by how many members answer them),
    dark = answered. Right: how often a child was split before each position."""
    import numpy as np

    by_index = {e.index: e for e in evaluations}
    tasks = list(archive.rows)
    matrix = np.array(
        [[c == "1" for t in tasks for c in (by_index[m.index].items or {}).get(t, "")] for m in archive.members],
        dtype=float,
    )
    with _style():
        fig = _figure(11, 0.9 + 0.32 * max(len(archive.members), 4))
        left, right = fig.subplots(1, 2, width_ratios=[3, 1])
        if matrix.size:
            order = np.argsort(-matrix.sum(axis=0), kind="stable")
            left.imshow(matrix[:, order], aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
        left.set_yticks(range(len(archive.members)))
        left.set_yticklabels([f"#{m.index} ({m.fitness:.2f})" for m in archive.members], fontsize=8)
        covered = ", ".join(f"{t} {archive.covered[t]}/{archive.rows[t]}" for t in tasks)
        left.set_title(f"Rows each member answers (archive covers {covered})")
        left.set_xlabel("fitness rows, most answered first")
        counts = [archive.splits.count(p) for p in range(len(archive.positions) + 1)]
        labels = [*archive.positions, "(whole)"]
        right.barh(range(len(counts)), counts, color="#1f77b4")
        right.set_yticks(range(len(counts)))
        right.set_yticklabels(labels, fontsize=8)
        right.invert_yaxis()
        right.set_title("Split point (first place at 1 - w)")
        right.set_xlabel("children")
        return _save(fig, out)


def ps_parameter_table(genome_config, num_layers: int, genome: list[float]) -> list[dict]:
    """One panel per (parameter, filter set): rows = source models (or 'shared'), columns = layer groups."""
    import numpy as np

    from mergekit_evolve.space.ps import PSSpace

    space = PSSpace(genome_config, num_layers)
    values = space.values(np.asarray(genome, dtype=float)[: space.dim])
    n_sets = len(space.filters) + 1
    panels: dict[tuple, dict] = {}
    for gene, value in zip(space.genes, values):
        key = (gene.param, gene.filter_set, gene.model is None)
        panel = panels.get(key)
        if panel is None:
            rows = 1 if gene.model is None else len(genome_config.models)
            panel = panels[key] = {
                "param": gene.param,
                "filter": _filter_label(space.filters, gene.filter_set, n_sets),
                "shared": gene.model is None,
                "lo": gene.lo,
                "hi": gene.hi,
                "values": np.full((rows, space.n_groups + (space.io_group is not None)), np.nan),
            }
        panel["values"][0 if gene.model is None else gene.model, gene.group] = value
    for panel in panels.values():
        panel["groups"] = [group_label(space, g) for g in range(panel["values"].shape[1])]
    return list(panels.values())


def _filter_label(filters: list[str], index: int, n_sets: int) -> str | None:
    if n_sets == 1:
        return None
    return f"tensors matching '{filters[index]}'" if index < len(filters) else "all other tensors"


def group_label(space, group: int) -> str:
    if group == space.io_group:
        return "embeddings, norm, lm_head"
    if space.n_groups == 1:
        return f"all {space.num_layers} layers"
    if space.genome.smooth:
        return f"gradient point {group + 1}"
    a = group * space.group_size
    return f"layers {a}-{a + space.group_size - 1}" if space.group_size > 1 else f"layer {a}"


def plot_ps_parameters(panels: list[dict], model_names: list[str], out: Path, title: str) -> Path:
    """Heatmaps of the best genome's parameter values (one panel per parameter and filter set)."""
    params = list(dict.fromkeys(p["param"] for p in panels))
    n_cols = max(sum(1 for p in panels if p["param"] == name) for name in params)
    n_groups = panels[0]["values"].shape[1]
    n_rows_cells = max(p["values"].shape[0] for p in panels)
    cell_w = 0.9 if n_groups <= 16 else 0.35
    width = max(7.5, n_cols * max(4.2, cell_w * n_groups + 2.6) + 1.2)
    height = len(params) * max(2.4, 0.5 * n_rows_cells + 1.6) + 0.8
    with _style():
        fig = _figure(min(width, 30), min(height, 30))
        grid = fig.add_gridspec(len(params), n_cols)
        for r, name in enumerate(params):
            for c, panel in enumerate(p for p in panels if p["param"] == name):
                _heatmap(fig, fig.add_subplot(grid[r, c]), panel, model_names)
        fig.suptitle(title, fontsize=13)
        return _save(fig, out)


def _heatmap(fig, ax, panel: dict, model_names: list[str]) -> None:
    import numpy as np

    values = panel["values"]
    masked = np.ma.masked_invalid(values)
    cmap = _cmap()
    image = ax.imshow(masked, cmap=cmap, vmin=panel["lo"], vmax=panel["hi"], aspect="auto")
    rows = ["shared by all models"] if panel["shared"] else model_names
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(
        range(values.shape[1]),
        panel["groups"],
        rotation=30 if values.shape[1] > 4 else 0,
        ha="right" if values.shape[1] > 4 else "center",
    )
    ax.set_xlabel("layer group")
    ax.set_ylabel("" if panel["shared"] else "source model")
    ax.set_title(panel["param"] + (f"\n{panel['filter']}" if panel["filter"] else ""))
    if values.size <= 240:
        for (i, j), v in np.ndenumerate(values):
            text, colour = (
                ("not used\n(base)", "#444444") if math.isnan(v) else (f"{v:.2f}", _text_colour(cmap, v, panel))
            )
            ax.text(j, i, text, ha="center", va="center", fontsize=10 if not math.isnan(v) else 8, color=colour)
    bar = fig.colorbar(image, ax=ax, shrink=0.9)
    bar.set_label(f"{panel['param']} (range {panel['lo']:g} to {panel['hi']:g})")


def _cmap():
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")


def _text_colour(cmap, value: float, panel: dict) -> str:
    span = (panel["hi"] - panel["lo"]) or 1.0
    r, g, b, _ = cmap((value - panel["lo"]) / span)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def plot_template_values(
    markers: list, values: list[float], out: Path, title: str, labels: list[str] | None = None
) -> Path:
    """Template runs: each marked number's best value inside its search range."""
    labels = labels or [m.where for m in markers]
    with _style():
        fig = _figure(10, max(2.6, 0.6 * len(markers) + 1.6))
        ax = fig.add_subplot()
        for i, (m, v) in enumerate(zip(markers, values)):
            ax.plot(
                [m.lo, m.hi],
                [i, i],
                color="#cccccc",
                linewidth=8,
                solid_capstyle="butt",
                label="search range" if i == 0 else None,
            )
            ax.scatter([v], [i], color="#1f77b4", s=60, zorder=3, label="best value" if i == 0 else None)
            ax.annotate(f"{v:.3g}", (v, i), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=9)
        ax.set_yticks(range(len(markers)), labels)
        ax.set_ylim(len(markers) - 0.5, -0.8)  # first marker on top, room for its label
        ax.set_xlabel("value")
        ax.set_title(title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="x", alpha=0.3)
        return _save(fig, out)


def template_labels(template: dict, markers: list, run_root: Path | None = None) -> list[str]:
    """``slices[0].sources[1].parameters.weight`` -> that, plus the model it belongs to."""
    labels = []
    for marker in markers:
        node, model = template, None
        for key in marker.path:
            if isinstance(node, dict) and isinstance(node.get("model"), str):
                model = node["model"]
            node = node[key]
        labels.append(marker.where + (f"\n({_short_name(model, run_root)})" if model else ""))
    return labels


def plot_dfs_path(
    path: dict, out: Path, title: str = "Best data-flow path", model_names: list[str] | None = None
) -> Path:
    """The path of a DFS candidate (``best.json``'s ``path``): which model's layer each hop runs
    (top) and the scale the hidden state gets before it (bottom)."""
    hops = [tuple(h) for h in path.get("hops", [])]
    scales = list(path.get("scales", []))
    names = model_names or display_names(list(path.get("models", [])))
    x = list(range(1, len(hops) + 1))
    with _style():
        fig = _figure(max(8.0, 0.32 * len(hops) + 3), 6.4)
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
        if not hops:
            top.text(0.5, 0.5, "empty path (no layer is used)", transform=top.transAxes, ha="center", va="center")
        else:
            _draw_hops(top, x, hops, names, base=int(path.get("base_index", 0)))
            _draw_scales(bottom, x, hops, scales)
        top.set_title(title)
        top.set_ylabel("layer index in its model")
        top.grid(alpha=0.3)
        bottom.set_xlabel("hop (order in which the hidden state passes through layers)")
        bottom.set_ylabel("input scale\n(hop 1: fixed 1.0)")
        bottom.grid(axis="y", alpha=0.3)
        return _save(fig, out)


def _draw_hops(ax, x: list[int], hops: list[tuple], names: list[str], base: int = 0) -> None:
    ax.plot(x, [layer for _, layer in hops], color="#999999", linewidth=1, zorder=1)
    for m in range(max(len(names), 1 + max(m for m, _ in hops))):
        idx = [i for i, (mm, _) in enumerate(hops) if mm == m]
        # model A always gives the embeddings, final norm and lm_head, even when none of its layers is used
        unused = " (embeddings and head only)" if m == base else " (not on the path)"
        label = f"{chr(65 + m)}: {names[m] if m < len(names) else m}" + ("" if idx else unused)
        ax.scatter(
            [x[i] for i in idx],
            [hops[i][1] for i in idx],
            s=70,
            color=MODEL_COLOURS[m % len(MODEL_COLOURS)],
            edgecolors="black",
            zorder=3,
            label=label,
        )
    if len(hops) <= 48:  # the hop's name as in DFSPath.summary: model letter + layer
        for xi, (m, layer) in zip(x, hops):
            ax.annotate(
                f"{chr(65 + m)}{layer}",
                (xi, layer),
                textcoords="offset points",
                xytext=(0, 9),
                ha="center",
                fontsize=9 if len(hops) <= 24 else 7,
            )
    max_layer = max(layer for _, layer in hops)
    ax.set_ylim(-0.6, max_layer + 0.9)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="colour = source model")


def _draw_scales(ax, x: list[int], hops: list[tuple], scales: list[float]) -> None:
    colours = [MODEL_COLOURS[m % len(MODEL_COLOURS)] for m, _ in hops]
    bars = ax.bar(x, scales, color=colours, edgecolor="black", linewidth=0.5)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="1.0 = unscaled")
    if len(x) <= 48:
        ax.bar_label(
            bars,
            fmt="%.2f",
            label_type="center",
            color="white",
            fontsize=8 if len(x) > 16 else 10,
            rotation=90 if len(x) > 16 else 0,
        )
    ax.set_ylim(0, max(max(scales, default=1.0), 1.0) * 1.2)
    ax.set_xticks(x if len(x) <= 40 else x[:: max(1, len(x) // 20)])
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


# -- the report ------------------------------------------------------------------------------------
def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the plots and ``report.md``; returns the path of report.md."""
    return render_report(run_dir, out)[0]


def render_report(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, list[tuple[str, Path]]]:
    """Write the plots and ``report.md``; returns report.md and the (caption, path) of every plot."""
    root = Path(run_dir).absolute()
    stages = load_stages(root)
    out = Path(out).absolute() if out else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    prefix = len(stages) > 1
    sections, images = [], []
    for stage in stages:
        stage_imgs = stage_images(stage, out, root, f"{stage.name}_" if prefix else "")
        if prefix:
            stage_imgs = [(f"{stage.name.upper()} stage: {caption}", path) for caption, path in stage_imgs]
        images += stage_imgs
        sections.append(_stage_section(stage, out, stage_imgs, prefix))
    atomic_write(out / "report.md", _report_header(root, stages) + "".join(sections))
    return out / "report.md", images


def stage_images(stage: Stage, out: Path, root: Path, prefix: str = "") -> list[tuple[str, Path]]:
    """Draw one stage's plots; returns (caption, path) pairs."""
    title = f"Fitness during the search: {STAGE_TITLES.get(stage.name, stage.name)}"
    images = [("Fitness of every evaluation", plot_fitness(stage.evaluations, out / f"{prefix}fitness.png", title))]
    if stage.best is not None:
        images.append(_best_image(stage, out, root))
    if stage.archive is not None:
        caption = "M2N2 archive: which fitness rows each member answers, and where children were split"
        images.append((caption, plot_archive(stage.archive, stage.evaluations, out / f"{prefix}archive.png")))
    if stage.front is not None:
        caption = "Pareto front (fitness split and held-out) with the sources and the start"
        images += [(caption, path) for path in plot_front(stage.front, stage.evaluations, out, prefix)]
    return [image for image in images if image is not None]


def _best_image(stage: Stage, out: Path, root: Path) -> tuple[str, Path] | None:
    """The best candidate drawn: its DFS path, its PS parameters or its template values."""
    best, config = stage.best, stage.config
    headline = f"best: evaluation {best.index}, fitness {best.fitness:.4g}"
    if best.path is not None:
        names = display_names(list(best.path["models"]), root)
        title = f"Best DFS path: {len(best.path['hops'])} hops ({headline})"
        return "Best data-flow path", plot_dfs_path(best.path, out / "dfs_path.png", title, names)
    if config.genome is not None:
        panels = ps_parameter_table(config.genome, _num_layers(stage), best.genome)
        names = display_names(list(config.genome.models), root)
        title = f"Best genome: {config.genome.merge_method} parameters per layer group and source model\n({headline})"
        return "Evolved merge parameters", plot_ps_parameters(panels, names, out / "ps_parameters.png", title)
    if config.template is not None:
        from mergekit_evolve.space.template import TemplateSpace

        space = TemplateSpace(config.template)
        values = space.values(best.genome[: space.dim])
        labels = template_labels(config.template, space.markers, root)
        title = f"Best values of the template's marked numbers\n({headline})"
        return "Evolved template values", plot_template_values(
            space.markers, values, out / "ps_template.png", title, labels
        )
    return None


def _num_layers(stage: Stage) -> int:
    """Layer count of the PS sources, from the merged model, a source config or the recipe itself."""
    genome = stage.config.genome
    candidates = [stage.path / "model" / "config.json"] + [Path(m) / "config.json" for m in genome.models]
    for path in candidates:
        if path.is_file():
            data = json.loads(path.read_text())
            n = data.get("num_hidden_layers") or (data.get("text_config") or {}).get("num_hidden_layers")
            if n:
                return int(n)
    slices = ((stage.best and stage.best.recipe) or {}).get("slices") or []
    ends = [s.get("layer_range", [0, 0])[1] for sl in slices for s in sl.get("sources", [])]
    if ends:
        return int(max(ends))
    if genome.layer_granularity == 0:
        return 1  # one group: the count does not change the genes
    raise InputError(
        f"{stage.path}: cannot tell the models' layer count (no model/config.json); report needs the merged model or "
        "the sources"
    )


def _report_header(root: Path, stages: list[Stage]) -> str:
    space = stages[0].config.space if len(stages) == 1 else "ps+dfs"
    lines = [f"# mergekit-evo report: `{root.name}`\n", f"Run directory: `{root}`  \nSearch space: **{space}**\n"]
    if len(stages) > 1:
        total = sum(len(s.evaluations) for s in stages)
        lines.append(
            f"Two stages: PS, then DFS over the PS model and the sources ({total} evaluations in all). "
            "The DFS stage's best is the final model.\n"
        )
    return "\n".join(lines) + "\n"


def _stage_section(stage: Stage, out: Path, images: list[tuple[str, Path]], staged: bool) -> str:
    parts = [f"## {'Stage: ' if staged else 'Search: '}{STAGE_TITLES.get(stage.name, stage.name)}\n"]
    parts.append(summary_table(stage) + "\n")
    for caption, image in images:
        parts.append(f"### {caption}\n\n![{caption}]({os.path.relpath(image, out)})\n")
    if stage.best is not None and stage.best.path is not None:
        from mergekit_evolve.space.dfs import DFSPath

        path = stage.best.path
        line = DFSPath(hops=path["hops"], scales=path["scales"]).summary()
        parts.append(f"Path (model letter + layer, `*scale` where not 1): `{line}`\n")
    if stage.front is not None:
        parts.append(front_table(stage.front))
    if stage.archive is not None:
        parts.append(archive_text(stage.archive))
    parts.append(_recipe_section(stage))
    return "\n".join(parts) + "\n"


def archive_text(archive: Archive) -> str:
    """The archive's members and the lineage of the best model (M2N2)."""
    tasks = list(archive.rows)
    rows = [
        "| member | evaluation | fitness | shared fitness | "
        + " | ".join(tasks)
        + " | rows only it answers | recipe |",
        "|---|---|---|---|" + "---|" * len(tasks) + "---|---|",
    ]
    for n, m in enumerate(archive.members):
        scores = " | ".join(format_score(m.scores.get(t)) for t in tasks)
        rows.append(
            f"| {n} | {m.index} | {format_score(m.fitness)} | {m.shared_fitness:.3g} | {scores} | {m.solved_alone} "
            f"| {m.recipe} |"
        )
    steps = []
    for d in archive.lineage:
        if d.source is not None:
            steps.append(f"- #{d.index}: source `{Path(d.source).name}`")
        elif d.parents:
            steps.append(f"- #{d.index} = #{d.parents[0]} x #{d.parents[1]}: {_mixing(archive, d.split, d.w)}")
    covered = ", ".join(f"{t}: {archive.covered[t]} of {archive.rows[t]}" for t in tasks)
    best = ", ".join(f"{t}: {archive.best_member_covers[t]}" for t in tasks)
    return (
        f"### M2N2 archive ({len(archive.members)} members, `archive.json`)\n\n" + "\n".join(rows) + "\n\n"
        f"Fitness rows answered by at least one member: {covered} (by the best member: {best}). Each member builds "
        "with `mergekit-yaml archive/NN.yaml OUT`.\n\n"
        "Lineage of the run's best (a child of A x B is `w A + (1 - w) B` before its split point and "
        "`(1 - w) A + w B` from it on):\n\n" + "\n".join(steps) + "\n"
    )


def _mixing(archive: Archive, split: int, w: float) -> str:
    if split == 0:
        return f"1 - w = {1 - w:.3f} for the whole model"
    if split >= len(archive.positions):
        return f"w = {w:.3f} for the whole model"
    return f"w = {w:.3f} up to `{archive.positions[split - 1]}`, 1 - w from `{archive.positions[split]}` on"


def front_table(front: Front) -> str:
    """The front's points: each objective on the fitness split and held-out, and the recipe that builds it."""
    names = front.objectives
    head = "| point | " + " | ".join(f"{n} (fitness)" for n in names) + " | "
    head += " | ".join(f"{n} (held-out)" for n in names) + " | held-out front | recipe |"
    rows = [head, "|" + "---|" * (2 * len(names) + 3)]
    for n, p in enumerate(front.points):
        held = [format_score(p.heldout[name]) if p.heldout else "-" for name in names]
        on_front = "-" if p.heldout_front is None else "yes" if p.heldout_front else "no"
        cells = [str(n), *(format_score(p.values[name]) for name in names), *held, on_front, p.recipe or "-"]
        rows.append("| " + " | ".join(cells) + " |")
    hv = f"Hypervolume (reference {front.reference}): {front.hypervolume:.4g} on the fitness split"
    if front.heldout_hypervolume is not None:
        hv += f", {front.heldout_hypervolume:.4g} on held-out"
    pick = ",".join(f"{n}=0.5" for n in names[:2])
    return (
        f"### Pareto front ({len(front.points)} points, `front.json`)\n\n" + "\n".join(rows) + f"\n\n{hv}. "
        f'Build a point: `mergekit-yaml front/NN.yaml OUT`, or `mergekit-evo export RUN --pick "{pick}" --out OUT`.\n'
    )


def _recipe_section(stage: Stage) -> str:
    if stage.best_yaml and stage.whole_run_recipe:
        return (
            "### Best recipe (the run's `best.yaml`: both stages, from the sources; its header names the command "
            f"that builds it)\n\n```yaml\n{stage.best_yaml.rstrip()}\n```\n"
        )
    if stage.best_yaml:
        return f"### Best recipe (`best.yaml`, plain mergekit YAML)\n\n```yaml\n{stage.best_yaml.rstrip()}\n```\n"
    if stage.best is not None and stage.best.path is not None:
        return (
            "### Best recipe\n\nThis path does not fold into a standard checkpoint; export it with "
            "`mergekit-evo export RUN_DIR --format custom`.\n"
        )
    return "### Best recipe\n\nNo successful candidate yet.\n"


def summary_rows(stage: Stage) -> list[tuple[str, str]]:
    """(label, value) rows shared by report.md and the model card."""
    rows: list[tuple[str, str]] = []
    best = stage.best
    if best is not None:
        rows.append(
            (
                "best fitness (selection data)",
                f"{best.fitness:.4f} (evaluation {best.index}, generation {best.generation})",
            )
        )
        if len(best.scores) > 1:
            rows.append(("fitness per task", _scores(best.scores)))
    else:
        rows.append(("best fitness (selection data)", "none yet"))
    if stage.heldout:
        rows.append(("held-out score (total)", format_score(stage.summary.best.heldout_total)))
        rows.append(("held-out score per task", _scores(stage.heldout)))
    elif stage.summary is None:
        rows.append(("held-out score", "not yet (scored when the search finishes)"))
    generations = len({e.generation for e in stage.evaluations})
    rows.append(("evaluations", f"{len(stage.evaluations)} in {generations} generation(s)"))
    rows.append(("failed evaluations", str(stage.failures)))
    rows.append(("repeated recipes (not re-evaluated)", str(stage.cached)))
    wall = stage.wall_seconds
    rows.append(("wall time", _duration(wall)))
    if wall:
        rows.append(("evaluations per hour", f"{len(stage.evaluations) / wall * 3600:,.0f}"))
    rows.append(("selected on", selection_text(stage)))
    if stage.summary is not None and stage.summary.validation is not None:
        from mergekit_evolve.search.validation import describe_decision

        rows.append(("DFS result confirmed on held-back rows", describe_decision(stage.summary.validation)))
    return rows


def summary_table(stage: Stage) -> str:
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary_rows(stage)]
    return "\n".join(lines) + "\n"


def selection_text(stage: Stage) -> str:
    """The data that chose the winner: task names and file names (never the held-out split)."""
    config = stage.config
    if config.builtin_fitness is not None:
        return ", ".join(
            f"`{t.name}`: {Path(t.data).name}" + (f" (first {t.limit})" if t.limit else "")
            for t in config.builtin_fitness.tasks
        )
    return ", ".join(f"lm-eval `{t.name}` ({t.metric})" for t in config.tasks or []) + (
        f", limit {config.limit}" if config.limit else ""
    )


def _scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {format_score(v)}" for k, v in scores.items())


def format_score(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"

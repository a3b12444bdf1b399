"""mergekit-evolve: evolutionary model merging on top of mergekit.

Pipeline (one sub-package per stage; docs/architecture.md has the picture):
    space/    genome <-> search-space definitions (PS parameters, template markers, DFS indicators + scales)
    recipe/   genome -> plain mergekit YAML (MergeConfiguration; DFS -> folded passthrough)
    merge/    recipe -> resident model (in-memory mergekit execution, layer pool for DFS)
    fitness/  model -> scores (built-in evaluators, lm-eval)
    search/   problems, the CMA-ES ask/tell loop, executors, typed run records, the run directory
    export/   best.yaml and models, custom-code checkpoint, report, model card, Hub push
    runner.py a whole run (validate, search each stage, held-out score, save); cli.py the commands
    zoo/      the embedded, seeded tiny model zoo that demos and tests stand on
"""

__version__ = "0.1.0"

# Before anything imports transformers: a torchvision (etc.) build that cannot load must not break it.
from mergekit_evolve.torch_extensions import hide_unloadable_torch_extensions

hide_unloadable_torch_extensions()

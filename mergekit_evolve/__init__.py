"""mergekit-evolve: evolutionary model merging on top of mergekit.

Pipeline (one sub-package per stage):
    space/    genome <-> search-space definitions (PS parameters, DFS indicator + scales)
    recipe/   genome -> plain mergekit YAML (MergeConfiguration; DFS -> folded passthrough)
    merge/    recipe -> resident model (in-memory mergekit execution, layer pool for DFS)
    fitness/  model -> scores (built-in evaluators, lm-eval)
    search/   CMA-ES ask/tell loop, run directory, resume
    export/   final model, custom-code checkpoint, Hub push, reports
    zoo/      the embedded, seeded tiny model zoo that demos and tests stand on
"""

__version__ = "0.1.0"

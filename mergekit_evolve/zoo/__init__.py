"""The embedded zoo: a seeded family of tiny Llama models with real, different skills.

The seed-0 zoo ships with the package (``shipped_zoo()``, ``zoo:`` references, the demo): nothing
trains on first use. ``build_zoo(seed=S)`` trains other seeds offline into the user cache
(``$MERGEKIT_EVOLVE_CACHE`` or ``~/.cache/mergekit_evolve``); ``mergekit-evo zoo build`` retrains
seed 0 with the same code and says whether the result matches the shipped files.
"""

from mergekit_evolve.zoo.build import ZOO_VERSION, Zoo, ZooTask, build_zoo, default_zoo_dir, shipped_zoo

__all__ = ["ZOO_VERSION", "Zoo", "ZooTask", "build_zoo", "default_zoo_dir", "shipped_zoo"]

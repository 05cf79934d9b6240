"""The one list of built-in methods. Importing this module registers every one of them.

Adding a method = one new module that calls `toolchain.registry.register` (the contract is in
toolchain/stages.py), plus one import line here. Code that looks methods up (recipes, overrides,
pipeline, CLI) imports the query functions from this module, so they always see the full list.
"""
from sqexport.toolchain.pruning import magnitude, nm  # noqa: F401  prune.magnitude, prune.nm
from sqexport.toolchain.pruning import structured_stage  # noqa: F401  prune.structured
from sqexport.toolchain.pruning import pqi_stage  # noqa: F401  prune.pqi
from sqexport.toolchain.pruning import sensitivity_stage  # noqa: F401  prune.sensitivity
from sqexport.toolchain.pruning import lowrank  # noqa: F401  prune.lowrank
from sqexport.toolchain import recover_step  # noqa: F401  recover.distill
from sqexport.toolchain.quantization import smoothing  # noqa: F401  transform.smoothquant
from sqexport.toolchain.quantization import equalization  # noqa: F401  transform.equalize
from sqexport.toolchain.quantization import int8  # noqa: F401  quantize.int8, quantize.int8-dynamic
from sqexport.toolchain.quantization import observers  # noqa: F401  observer.minmax/percentile/entropy/mse
from sqexport.toolchain.registry import StageEntry, config_from_dict, config_to_dict, entries, lookup, names

__all__ = ["StageEntry", "config_from_dict", "config_to_dict", "entries", "lookup", "names"]

"""Pruning in torch: prunable layers, masks, sparsity. The methods (magnitude.py, nm.py) are
listed in toolchain/builtin_methods.py; importing this package registers nothing."""
from sqexport.toolchain.pruning.masks import apply_masks, layer_sparsity, overall_sparsity, prunable_layers

__all__ = ["prunable_layers", "apply_masks", "layer_sparsity", "overall_sparsity"]

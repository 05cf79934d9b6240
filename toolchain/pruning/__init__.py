"""Pruning methods; importing this package registers them."""
from toolchain.pruning import magnitude, nm, structured_stage  # noqa: F401
from toolchain.pruning.masks import apply_masks, layer_sparsity, overall_sparsity, prunable_layers

__all__ = ["prunable_layers", "apply_masks", "layer_sparsity", "overall_sparsity"]

"""Quantization in torch: observers, calibration, weight quantization, fake-quant reference,
smoothing and fallback. The methods themselves (registered configs + handlers) are listed in
toolchain/builtin_methods.py; importing this package registers nothing."""
from sqexport.toolchain.quantization.static import calibrate, fake_quant_model, quantize_embeddings, quantize_weights

__all__ = ["calibrate", "fake_quant_model", "quantize_embeddings", "quantize_weights"]

"""sqexport: prune, quantize (int8 QDQ), export to ONNX, verify and package neural networks.

The repository keeps its layers in top-level folders (contracts, models, exporters, runtime_check,
toolchain); the install maps them under this package, so only `sqexport` lands in site-packages.
"""
__version__ = "0.1.0"

"""The bottom layer: the error hierarchy and plain data contracts every other layer may import.

Layers, bottom to top: contracts -> models -> exporters -> runtime_check -> toolchain.
Nothing here imports from the project's other packages.
"""

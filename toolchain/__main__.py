"""`python -m toolchain ...` is the `sqexport` console script."""
from toolchain.cli import main

main()

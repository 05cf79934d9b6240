"""`python -m sqexport ...` is the `sqexport` console script."""
import sys

try:
    from sqexport.toolchain import signals

    signals.install()  # before the CLI's imports, so Ctrl-C during start-up is one line too
    from sqexport.toolchain.cli import main
except KeyboardInterrupt:  # before install(): Python's own handler
    print("Error: interrupted by SIGINT", file=sys.stderr)
    sys.exit(130)
except BaseException as exc:
    if type(exc).__name__ != "Interrupted":
        raise
    print(f"Error: interrupted by {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)

main()

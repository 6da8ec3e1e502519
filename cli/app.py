"""Placeholder entry point until the Typer CLI lands (issue: CLI and zoo report)."""
import sys


def main() -> None:
    sys.stderr.write("nerofy: the command line is not built yet; use the Python API (nerofy.wrap)\n")
    raise SystemExit(2)

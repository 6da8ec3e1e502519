"""``python -m nerofy``: the same command line as the ``nerofy`` console script.

The CLI lives in the optional package ``nerofy_cli`` (typer + rich, the ``cli`` extra); the library
itself never imports them.
"""
import sys


def main() -> None:
    try:
        import typer  # noqa: F401
        import rich  # noqa: F401
    except ImportError as e:
        sys.stderr.write(f"nerofy: the command line needs typer and rich ({e.name or e} is missing): "
                         "pip install 'nerofy[cli]'\n")
        raise SystemExit(1)
    try:
        from nerofy_cli.app import main as cli_main
    except ImportError as e:
        sys.stderr.write(f"nerofy: cannot import the command line package nerofy_cli ({e}); "
                         "install the project with pip install -e '.[cli]'\n")
        raise SystemExit(1)
    cli_main()


if __name__ == "__main__":
    main()

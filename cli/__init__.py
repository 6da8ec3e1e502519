"""nerofy's command line (installed as the package ``nerofy_cli``)."""

"""The `treadle` command line (Typer + Rich). The entry point is `treadle.cli.main:main`."""

"""PLACEHOLDER: replaced by the module's owner (the whole file)."""

import typer

app = typer.Typer(help="Not built yet.")

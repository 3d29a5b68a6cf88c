"""The `artloop` command line (Typer): the root command in main.py, one module per command
group (runs, batch, session, serve, export, train, models, doctor), and common.py for what they
share (options, config loading, failing with one line)."""

from artloop.cli.main import app, main

__all__ = ["app", "main"]

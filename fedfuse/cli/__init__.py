"""Command-line entry points (``fedfuse …``), built with typer."""

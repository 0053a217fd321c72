"""Thin Typer front end: one module per subcommand (parse, call the library, render)."""

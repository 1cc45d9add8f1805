"""`cones` entry point. Sub-command groups live in their own modules and register here."""
from __future__ import annotations

import typer

app = typer.Typer(name="cones", help="Personalize Stable Diffusion: learn concepts, generate them.",
                  no_args_is_help=True, add_completion=False)


@app.command()
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as v

    typer.echo(v("cones"))

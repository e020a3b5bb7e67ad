"""The ``vitscope`` command line. Each sub-command lives in its own module of this package."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="vitscope",
    help="See how attention works inside Vision Transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# Sub-commands register themselves on `app` when imported.
from vitscope.cli import demo, info  # noqa: E402,F401
from vitscope.cli import train  # noqa: E402,F401
from vitscope.cli import analyze  # noqa: E402,F401
from vitscope.cli import serve  # noqa: E402,F401


def main() -> None:
    app()

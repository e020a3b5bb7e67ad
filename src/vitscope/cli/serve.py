"""``vitscope serve``: the web app over a finished run, with the run's model loaded for live queries."""

from __future__ import annotations

import webbrowser
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from vitscope.cli import app


@app.command()
def serve(
    run: Path = typer.Argument(..., help="run folder written by `vitscope analyze` or `vitscope demo`"),
    host: str = typer.Option("127.0.0.1", "--host", help="interface to listen on; 127.0.0.1 = this machine only, 0.0.0.0 = every interface"),
    port: int = typer.Option(8765, "--port", "-p", min=0, max=65535, help="port to listen on (0 = any free port)"),
    no_model: bool = typer.Option(False, "--no-model", help="do not load the model: no live attention, pruning or interactions"),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="the model's weights file, when the run's model spec alone does not find it (e.g. a timm name offline)"),
    device: str = typer.Option("cpu", "--device", help="device for live queries: cpu, cuda, cuda:1 ..."),
    open_browser: bool = typer.Option(False, "--open/--no-open", help="open the app in a web browser"),
) -> None:
    """Serve the web app over RUN at http://HOST:PORT/ until Ctrl-C.

    The app shows the run's head importance, attention strength, attention patterns and (when the
    run has them) patch interactions as linked views. With the run's model loaded, it also computes
    attention matrices, partial pruning and patch interactions live for any image of the run.
    The API it uses is described in docs/api.md.
    """
    console = Console(stderr=True)
    serve_run(run, console, host=host, port=port, model=not no_model, weights=weights, device=device, open_browser=open_browser)


def serve_run(
    run: Any,
    console: Console,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    model: bool = True,
    weights: Optional[str] = None,
    device: str = "cpu",
    open_browser: bool = False,
    vit: Any = None,
) -> None:
    """Serve ``run`` (a folder or an open run) in the foreground; used by ``serve`` and ``demo``."""
    try:
        from vitscope.server.app import app_for_run
        from vitscope.server.runner import ServeError, bind, serve_forever, url_of
    except ImportError as e:
        _fail(console, f"the web app needs FastAPI and uvicorn ({e}); install them with pip install 'vitscope[server]'")
    from vitscope.store import RunError

    try:
        application = app_for_run(run, model=model, weights=weights, device=device, vit=vit)
    except RunError as e:
        _fail(console, str(e))
    live = application.state.live
    if live.available:
        console.print(f"live queries on: {live.vit.name} on {live.vit.device}")
        if live.warning:
            console.print(f"[yellow]warning:[/yellow] {live.warning}")
    else:
        console.print(f"[yellow]live queries off:[/yellow] {live.reason}")
    try:
        sock = bind(host, port)
    except ServeError as e:
        _fail(console, str(e))
    url = url_of(sock)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]listening on {host}: anyone who can reach this machine can read the run[/yellow]")
    console.print(f"vitscope app for {application.state.data.path}: [bold]{url}[/bold]  (Ctrl-C to stop)")
    if open_browser:
        webbrowser.open(url)
    serve_forever(application, sock)


def _fail(console: Console, message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=2)

"""``vitscope.show``: the web app inside a Jupyter or VS Code notebook.

The server runs on ``127.0.0.1`` in a daemon thread of the notebook's own process, so it needs no
internet and stops with the kernel. One server per run folder: showing the same run again reuses it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional, Union

_servers: dict[Path, Any] = {}
_lock = threading.Lock()


def _run_key(run_or_path: Any) -> tuple[Path, Any]:
    if hasattr(run_or_path, "manifest") and hasattr(run_or_path, "path"):
        return Path(run_or_path.path).resolve(), run_or_path
    return Path(run_or_path).resolve(), None


def show(
    run_or_path: Union[str, Path, Any],
    port: Optional[int] = None,
    height: int = 900,
    *,
    model: bool = True,
    weights: Optional[str] = None,
    device: str = "cpu",
) -> Any:
    """Show the web app for a run folder (or an open :class:`~vitscope.store.Run`) in a notebook.

    Starts the server on ``127.0.0.1:port`` (``None``: any free port) in a background thread,
    waits until it answers and returns an ``IPython.display.IFrame`` of ``height`` pixels, which
    the notebook displays. Showing the same run again reuses its server. The run's model is loaded
    for live queries unless ``model=False`` (``weights``: its weights file, when needed).

    Without IPython (a plain Python session) it prints and returns the app's URL instead.
    Stop the server with :func:`vitscope.server.stop`.
    """
    from vitscope.server.app import app_for_run
    from vitscope.server.runner import BackgroundServer

    key, run = _run_key(run_or_path)
    with _lock:
        server = _servers.get(key)
        if server is not None and not server.running:
            _servers.pop(key, None)
            server = None
        if server is not None and port not in (None, 0) and not server.url.endswith(f":{port}/"):
            server.stop()
            _servers.pop(key, None)
            server = None
        if server is None:
            app = app_for_run(run if run is not None else key, model=model, weights=weights, device=device)
            server = BackgroundServer(app, "127.0.0.1", port or 0).start()
            _servers[key] = server
    url = server.url
    try:
        from IPython.display import IFrame
    except ImportError:
        print(f"vitscope app for {key}: {url}  (IPython is not installed, so it cannot be shown inline; open the URL in a browser)")
        return url
    return IFrame(url, width="100%", height=height)


def url(run_or_path: Union[str, Path, Any]) -> Optional[str]:
    """The URL of the server :func:`show` started for this run, or None."""
    key, _ = _run_key(run_or_path)
    server = _servers.get(key)
    return server.url if server is not None and server.running else None


def stop(run_or_path: Union[str, Path, Any, None] = None) -> None:
    """Stop the server :func:`show` started for this run (``None``: every such server)."""
    with _lock:
        keys = list(_servers) if run_or_path is None else [_run_key(run_or_path)[0]]
        for k in keys:
            server = _servers.pop(k, None)
            if server is not None:
                server.stop()

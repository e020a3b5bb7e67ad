"""The built web app's files (``vitscope/server/static``), served without ever leaving that folder."""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Optional
from urllib.parse import unquote

#: Where ``cd web && npx vite build`` puts the app (shipped inside the wheel).
STATIC_DIR = Path(__file__).resolve().parent / "static"

NOT_BUILT_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vitscope</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 3em auto">
<h1>vitscope</h1>
<p>The web app is not built in this installation, so only the API is served
(<a href="api/run">api/run</a>).</p>
<p>Build it from the repository with <code>bash scripts/setup.sh</code>
(or <code>cd web &amp;&amp; npm ci &amp;&amp; npx vite build</code>), then restart the server.</p>
</body></html>
"""

mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")
mimetypes.add_type("text/css", ".css")
mimetypes.add_type("image/svg+xml", ".svg")
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("application/json", ".map")


def safe_file(root: Path, request_path: str) -> Optional[Path]:
    """The file ``request_path`` names inside ``root``, or None when it is not one.

    Refused (None): empty or absolute paths, ``.``/``..`` segments, backslashes, NUL, drive
    letters, hidden files, anything still percent-encoded after the server's one decoding (so
    ``%2e%2e%2f`` sent double-encoded stays refused), and whatever resolves outside ``root``
    (symbolic links included).
    """
    p = request_path
    if not p or "\x00" in p or "\\" in p or ":" in p or "%" in p or unquote(p) != p:
        return None
    if p.startswith("/") or p.startswith("~"):
        return None
    parts = p.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return None
    root = root.resolve()
    try:
        target = root.joinpath(*parts).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if not target.is_relative_to(root) or not target.is_file():
        return None
    return target


def media_type(path: Path) -> str:
    kind, _ = mimetypes.guess_type(path.name)
    return kind or "application/octet-stream"

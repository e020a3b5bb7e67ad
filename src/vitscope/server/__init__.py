"""The web app's server: ``vitscope serve``, ``vitscope demo`` and :func:`vitscope.show` (docs/api.md).

Needs the ``server`` extra (``pip install 'vitscope[server]'``: FastAPI and uvicorn).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from vitscope.server.app import create_app

        return create_app
    if name in ("show", "stop"):
        from vitscope.server import notebook

        return getattr(notebook, name)
    raise AttributeError(f"module 'vitscope.server' has no attribute {name!r}")


__all__ = ["create_app", "show", "stop"]

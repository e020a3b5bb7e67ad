"""Build hook: a wheel built from the repository always contains the built web app.

Everything else about the package is in pyproject.toml. Before the Python files are collected,
``build_py`` makes sure ``src/vitscope/server/static/index.html`` is there and up to date with
``web/``: it runs ``npm ci`` (when ``web/node_modules`` is missing) and ``npx vite build`` when
``npm`` is available and the app's sources changed since the last build (the same stamp
``scripts/setup.sh`` keeps). Without ``npm`` and without a built app, a wheel build fails with a
message that says how to fix it; an editable install only warns (the server then says how to build).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
WEB = ROOT / "web"
INDEX = ROOT / "src" / "vitscope" / "server" / "static" / "index.html"
STAMP = WEB / ".setup-stamp"
#: What the built app depends on (hashed the same way by scripts/setup.sh).
SOURCES = ("web/src", "web/index.html", "web/package-lock.json", "web/vite.config.ts", "web/svelte.config.js", "web/tsconfig.json")


def web_sources_hash() -> str:
    """sha256 over ``sha256sum``-style lines of every source file, in byte order of their paths."""
    files: list[str] = []
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            files += [str(f.relative_to(ROOT)) for f in p.rglob("*") if f.is_file()]
        elif p.is_file():
            files.append(name)
    lines = "".join(f"{hashlib.sha256((ROOT / f).read_bytes()).hexdigest()}  {f}\n" for f in sorted(files, key=lambda s: s.encode()))
    return hashlib.sha256(lines.encode()).hexdigest()


def build_web_app() -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed")
    if not (WEB / "node_modules").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=WEB, check=True)
    subprocess.run([shutil.which("npx") or "npx", "vite", "build"], cwd=WEB, check=True)
    STAMP.write_text(web_sources_hash() + "\n")


class BuildPyWithWebApp(build_py):
    def run(self) -> None:
        editable = bool(getattr(self, "editable_mode", False))
        if (WEB / "package.json").is_file():
            stale = not INDEX.is_file() or not STAMP.is_file() or STAMP.read_text().strip() != web_sources_hash()
            if stale and shutil.which("npm") is not None:
                print("building the web app (npm ci / npx vite build in web/)", file=sys.stderr)
                build_web_app()
        if not INDEX.is_file():
            message = (
                f"the web app is not built ({INDEX.relative_to(ROOT)} is missing) and npm is not available to build it. "
                "Install Node.js and npm (Debian: apt-get install nodejs npm), then run `bash scripts/setup.sh` "
                "or `cd web && npm ci && npx vite build`, and build again."
            )
            if not editable:
                raise SystemExit(f"error: {message}")
            print(f"warning: {message}", file=sys.stderr)
        super().run()


if __name__ == "__main__":  # setuptools runs this file as __main__; importing it builds nothing
    setup(cmdclass={"build_py": BuildPyWithWebApp})

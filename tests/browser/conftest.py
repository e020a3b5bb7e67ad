"""The browser-test harness: real runs, a real server, and headless Chromium driven by Playwright.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``scripts/setup.sh``), never a browser
downloaded by Playwright. These tests are part of the default suite and never skip: a missing
browser, a missing build of the app or a missing Playwright is a failure with a message saying how
to set it up.

Fixtures
--------
``browser_run``   a real run of the built-in model on 24 embedded sample images, with interactions.
``vit``           the built-in model, loaded once.
``server``        the app and its API over ``browser_run`` with the model loaded (``server.url``).
``make_server``   ``make_server(run, vit=None, live_reason=...)`` another server (stopped at the end).
``page``          a fresh 1920x1080 page; at teardown it fails the test on any console error, page
                  error, failed API answer (other than ``409 superseded``) or request to a host other
                  than 127.0.0.1.
``open_app``      ``open_app(page, server=None, hash="")``: load the app and wait until every view has
                  drawn; returns the page.
``wait_drawn``    ``wait_drawn(page, since=None)``: wait until the views have settled (two frames
                  passed, no view waits for a live answer or a table; with ``since``, some view
                  redrew after that ``performance.now()``).
``select``        ``select(page, head=2, ...)``: change the shared selection and wait as above.
``shot``          ``shot(page, name, selector=None)``: a PNG screenshot in the artifacts folder.

Artifacts (screenshots, downloads) go to ``$VITSCOPE_ARTIFACTS`` or ``tests/browser/artifacts``.
``$VITSCOPE_STATIC_DIR`` points the servers at another build of the app (default: the package's).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse

import pytest
from harness import READY_TIMEOUT_MS, select, shot, wait_drawn

import vitscope

CHROMIUM = Path(os.environ.get("VITSCOPE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1920, "height": 1080}


def static_dir() -> Optional[Path]:
    d = os.environ.get("VITSCOPE_STATIC_DIR")
    return Path(d) if d else None


def _check_built() -> None:
    from vitscope.server.static import STATIC_DIR

    root = static_dir() or STATIC_DIR
    if not (root / "index.html").is_file():
        pytest.fail(f"the web app is not built at {root}; run `bash scripts/setup.sh` (or `cd web && npm ci && npx vite build`)")


# --------------------------------------------------------------------------- runs and servers
@pytest.fixture(scope="session")
def browser_run(tmp_path_factory) -> Path:
    """A real run of the built-in model on 24 sample images, with patch interactions and two explanation methods (fast settings)."""
    from vitscope.pipeline import AnalyzeSettings

    settings = AnalyzeSettings(
        batch_size=12, n_boot=50, curve_images=12, curve_points=3, ae_epochs=2, ae_min_steps=30,
        projection="pca", n_clusters=3, interactions=True, explain=("rollout", "relevance"),
    )
    out = tmp_path_factory.mktemp("browser") / "run"
    run = vitscope.analyze("fmnist_vit_tiny", "sample", out, limit=24, settings=settings, device="cpu", progress=False)
    return Path(run.path)


@pytest.fixture(scope="session")
def vit():
    return vitscope.load_model("fmnist_vit_tiny", device="cpu")


class _Servers:
    def __init__(self) -> None:
        self.running: list[Any] = []

    def start(self, run: Any, vit: Any = None, **kw: Any) -> Any:
        from vitscope.server.app import create_app
        from vitscope.server.runner import BackgroundServer

        _check_built()
        app = create_app(run, vit, static_dir=static_dir(), **kw)
        srv = BackgroundServer(app, "127.0.0.1", 0).start()
        self.running.append(srv)
        return srv

    def stop(self) -> None:
        for srv in self.running:
            srv.stop()
        self.running.clear()


@pytest.fixture(scope="session")
def _servers():
    s = _Servers()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def server(_servers, browser_run, vit):
    """The app over ``browser_run`` with the built-in model loaded for live queries."""
    return _servers.start(browser_run, vit)


@pytest.fixture(scope="session")
def make_server(_servers) -> Callable[..., Any]:
    return _servers.start


# --------------------------------------------------------------------------- the browser
@pytest.fixture(scope="session")
def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed; run `bash scripts/setup.sh` (it installs the test extra)")
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}; run `bash scripts/setup.sh` (apt-get install -y chromium)")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="session")
def browser(_playwright):
    b = _playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
    yield b
    b.close()


class PageProblems:
    """What went wrong in a page: console errors, page errors, failed answers, outside requests."""

    def __init__(self) -> None:
        self.console: list[str] = []
        self.page_errors: list[str] = []
        self.failed: list[str] = []
        self.outside: list[str] = []
        self.allowed_statuses: set[int] = set()

    def report(self) -> list[str]:
        return self.console + self.page_errors + self.failed + self.outside


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    pg = context.new_page()
    problems = PageProblems()
    pg.problems = problems  # type: ignore[attr-defined]

    def on_console(msg: Any) -> None:
        if msg.type != "error":
            return
        # Chromium logs every non-2xx fetch as a console error; those are judged by on_response.
        if msg.text.startswith("Failed to load resource"):
            return
        problems.console.append(f"console error: {msg.text}")

    def on_response(resp: Any) -> None:
        if resp.status < 400 or resp.status in problems.allowed_statuses:
            return
        if resp.status == 409:
            try:
                if resp.json().get("error") == "superseded":
                    return
            except Exception:
                pass
        problems.failed.append(f"HTTP {resp.status} for {resp.url}")

    def on_request(req: Any) -> None:
        host = urlparse(req.url).hostname
        if req.url.startswith(("data:", "blob:", "about:")):
            return
        if host != "127.0.0.1":
            problems.outside.append(f"request beyond 127.0.0.1: {req.url}")

    pg.on("console", on_console)
    pg.on("pageerror", lambda e: problems.page_errors.append(f"page error: {e}"))
    pg.on("response", on_response)
    pg.on("request", on_request)
    yield pg
    found = problems.report()
    context.close()
    if found and not request.node.get_closest_marker("allow_page_errors"):
        pytest.fail("the page reported problems:\n" + "\n".join(found[:20]))


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_page_errors: the test provokes errors on purpose")


@pytest.fixture
def open_app(server) -> Callable[..., Any]:
    def _open(pg: Any, srv: Any = None, hash: str = "") -> Any:
        srv = srv or server
        url = srv.url + ("#" + hash.lstrip("#") if hash else "")
        pg.goto(url)
        pg.wait_for_function("() => window.vitscope && window.vitscope.ready === true", timeout=READY_TIMEOUT_MS)
        wait_drawn(pg)
        return pg

    return _open


@pytest.fixture(name="wait_drawn")
def _wait_drawn_fixture() -> Callable[..., None]:
    return wait_drawn


@pytest.fixture(name="select")
def _select_fixture() -> Callable[..., None]:
    return select


@pytest.fixture(name="shot")
def _shot_fixture() -> Callable[..., Path]:
    return shot


@pytest.fixture
def downloads(tmp_path) -> Path:
    d = tmp_path / "downloads"
    d.mkdir()
    return d

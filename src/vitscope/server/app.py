"""The web app's server: a FastAPI application over one finished run (docs/api.md).

:func:`create_app` builds it; ``vitscope serve``, ``vitscope demo`` and :func:`vitscope.show` run it
with uvicorn. Requests for the run's own data are plain (threadpool) endpoints; live model queries
are ``async`` endpoints that await the single model worker (:mod:`vitscope.server.live`), so a slow
model query never holds up the static views.

First load: when the server starts it computes, in the background, every answer the app's first
screen asks for (the run description, the tables and arrays the views load, the first image, and
the live answers for the first selection), so the first page finds them ready; the index page names
the start-up requests in a ``Link: rel=preload`` header, so the browser sends them while it is still
loading the app's script. Answers are byte-for-byte those computed on request.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Hashable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from vitscope.analysis.metrics import metric_label
from vitscope.server.data import LRU, RunData, array_headers, parse_image_id, to_wire
from vitscope.server.errors import ApiError, bad_parameter, not_found
from vitscope.server.live import LiveModel
from vitscope.server.static import NOT_BUILT_PAGE, STATIC_DIR, media_type, safe_file

ARROW_STREAM = "application/vnd.apache.arrow.stream"
_CLIENT_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

#: The tables the web app loads before it draws anything (web/src/lib/run.svelte.ts: the first three
#: always, the others when the run has them), then the ones its views load at once.
START_TABLES = ("images", "heads", "image_heads", "curves", "agreement", "patterns", "pattern_clusters")
VIEW_TABLES = ("window_curve", "removal_summary")
#: The start-up tables the index page asks the browser to preload: every run's three and the largest.
PRELOAD_TABLES = ("images", "heads", "image_heads", "patterns")
#: The selection the app opens on when its URL names none (web/src/lib/selection.svelte.ts
#: DEFAULTS): the images table's first image, layer 0, head 0, source patch 0, interaction layer 0.
FIRST_LAYER, FIRST_HEAD, FIRST_QUERY = 0, 0, 0
#: Side of the selected image in the image overview (web/src/views/ImageOverview.svelte).
OVERVIEW_IMAGE_SIZE = 176


def create_app(
    run: Any,
    vit: Any = None,
    *,
    live_reason: Optional[str] = None,
    live_warning: Optional[str] = None,
    static_dir: Optional[Path] = None,
    warm: bool = True,
) -> FastAPI:
    """The web app and its API over ``run`` (a :class:`vitscope.store.Run` or a run folder).

    ``vit``: the run's model, loaded (see :func:`vitscope.server.live.load_live_model`), for live
    queries; without it live queries answer ``409 no_model`` with ``live_reason``.
    ``static_dir``: the built app (default: the one inside the package).
    ``warm``: when the server starts, compute the first screen's answers in the background (see
    the module's docstring); off, everything is computed on request.
    """
    data = RunData(run)
    live = LiveModel(data, vit, reason=live_reason, warning=live_warning)
    static_root = Path(static_dir) if static_dir is not None else STATIC_DIR
    run_json = _Once(lambda: JSONResponse(_finite(run_info(data, live))).body)
    first = FirstScreen(data, live)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        app.state.warmed = threading.Event()  # set when the start-up work of this start is done
        if warm:
            first.start()
            threading.Thread(target=warm_caches, args=(data, run_json, stop, app.state.warmed), name="vitscope-warm", daemon=True).start()
        else:
            app.state.warmed.set()
        yield
        stop.set()
        first.cancel()
        live.shutdown()

    app = FastAPI(title="vitscope", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.data = data
    app.state.live = live
    app.state.first_screen = first
    app.state.warmed = threading.Event()
    app.state.static_root = static_root

    # ---------------------------------------------------------------- errors
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.to_json(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return JSONResponse({"error": "not_found", "detail": f"nothing is served at {request.url.path}; see docs/api.md"}, status_code=404)
        if exc.status_code == 405:
            return JSONResponse({"error": "method_not_allowed", "detail": f"{request.method} is not allowed here; the API is read-only (GET)"}, status_code=405)
        return JSONResponse({"error": f"http_{exc.status_code}", "detail": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path"))
            parts.append(f"{where}: {err.get('msg')}")
        return JSONResponse({"error": "bad_parameter", "detail": "; ".join(parts) or "bad parameter"}, status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"error": "internal", "detail": f"the server failed ({type(exc).__name__}: {exc}); please report this with the URL"},
            status_code=500,
        )

    # ------------------------------------------------------------------- api
    @app.get("/api/run")
    def api_run() -> Response:
        # Computed once: it reads several files and the answer never changes while the server runs.
        return Response(run_json(), media_type="application/json")

    @app.get("/api/table/{name}")
    def api_table(name: str, columns: Optional[str] = None) -> Response:
        return Response(data.table_ipc(name, columns), media_type=ARROW_STREAM)

    @app.get("/api/array/{name:path}")
    def api_array(name: str, index: Optional[str] = None) -> Response:
        body, headers = data.array_bytes(name, index)
        return Response(body, media_type="application/octet-stream", headers=headers)

    @app.get("/api/image/{filename}")
    def api_image(filename: str, size: Optional[str] = None) -> Response:
        if not filename.endswith(".png"):
            raise not_found(f"images are served as /api/image/<image_id>.png, not {filename!r}")
        iid = parse_image_id(filename[: -len(".png")])
        side = _int(size, "size") if size is not None else None
        return Response(data.image_png(iid, side), media_type="image/png")

    @app.get("/api/live/attention/{image_id}/{layer}/{head}")
    async def api_live_attention(image_id: str, layer: str, head: str, client: Optional[str] = None) -> Response:
        cid, iid, li, hi = _client(client), parse_image_id(image_id), _int(layer, "layer"), _int(head, "head")
        a = await first.answer(("attention", iid, li, hi))
        if a is None:
            a = await live.attention(cid, iid, li, hi)
        a = to_wire(a)
        attrs = {"dims": ["query", "key"], "image_id": int(image_id), "layer": int(layer), "head": int(head)}
        return Response(a.tobytes(), media_type="application/octet-stream", headers=array_headers(a, attrs))

    @app.get("/api/live/partial_pruning/{image_id}/{layer}/{head}")
    async def api_live_partial_pruning(image_id: str, layer: str, head: str, client: Optional[str] = None) -> JSONResponse:
        cid, iid, li, hi = _client(client), parse_image_id(image_id), _int(layer, "layer"), _int(head, "head")
        out = await first.answer(("partial_pruning", iid, li, hi))
        if out is None:
            out = await live.partial_pruning(cid, iid, li, hi)
        return JSONResponse(_finite(out))

    @app.get("/api/live/interaction/{image_id}/{layer}/{query}")
    async def api_live_interaction(image_id: str, layer: str, query: str, client: Optional[str] = None) -> Response:
        cid, iid, li, qi = _client(client), parse_image_id(image_id), _int(layer, "layer"), _int(query, "query")
        a = await first.answer(("interaction", iid, li, qi))
        if a is None:
            a = await live.interaction(cid, iid, li, qi)
        a = to_wire(a)
        attrs = {"dims": ["key"], "image_id": int(image_id), "layer": int(layer), "query": int(query)}
        return Response(a.tobytes(), media_type="application/octet-stream", headers=array_headers(a, attrs))

    @app.get("/api/{rest:path}")
    def api_unknown(rest: str) -> Response:
        raise not_found(f"no API endpoint /api/{rest}; the endpoints are listed in docs/api.md")

    # ---------------------------------------------------------------- static
    @app.get("/")
    def index() -> Response:
        page = safe_file(static_root, "index.html")
        if page is None:
            return HTMLResponse(NOT_BUILT_PAGE, status_code=503)
        return FileResponse(page, media_type="text/html", headers={"Cache-Control": "no-cache", "Link": preload_links(data)})

    @app.get("/{path:path}")
    def static_file(path: str) -> Response:
        f = safe_file(static_root, path)
        if f is None:
            raise not_found(f"no app file {path!r}")
        cache = "public, max-age=31536000, immutable" if path.startswith("assets/") else "no-cache"
        return FileResponse(f, media_type=media_type(f), headers={"Cache-Control": cache})

    return app


def preload_links(data: RunData) -> str:
    """The index page's ``Link`` header: the first requests the app makes before it draws anything,
    so the browser sends them while it loads the script instead of after: ``/api/run`` and the
    start-up tables :data:`PRELOAD_TABLES`. Only five, because a browser opens six connections
    to a host and the script needs one of them. Relative URLs, like the app's own, so a server
    behind a path prefix works; ``crossorigin`` makes the preloads match the app's ``fetch()``
    calls (same-origin credentials), so the app's requests are answered by them."""
    tables = set(data.table_names())
    urls = ["api/run"] + [f"api/table/{t}" for t in PRELOAD_TABLES if t in tables]
    return ", ".join(f"<{u}>; rel=preload; as=fetch; crossorigin" for u in urls)


class _Once:
    """``make()``'s value, computed on the first call (once, even when calls race) and kept."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._cache = LRU(1)

    def __call__(self) -> Any:
        return self._cache.get("value", self._make)


def warm_caches(data: RunData, run_json: Callable[[], bytes], stop: threading.Event, done: Optional[threading.Event] = None) -> None:
    """Compute, one after the other, the answers the app's first screen asks for, in the order it
    asks: the run description, the start-up tables, the arrays its views load at once, and the
    first image. They land in the same caches the endpoints read (a request for an answer being
    computed here waits for it rather than computing it again). Errors are left to the request
    that meets them; ``stop`` (set when the server shuts down) ends the work early; ``done`` is set
    at the end either way."""
    try:
        _warm(data, run_json, stop)
    finally:
        if done is not None:
            done.set()


def _warm(data: RunData, run_json: Callable[[], bytes], stop: threading.Event) -> None:
    steps: list[Callable[[], Any]] = [run_json]
    try:
        tables = set(data.table_names())
        arrays = set(data.array_names())
        steps += [lambda t=t: data.table_ipc(t) for t in START_TABLES + VIEW_TABLES if t in tables]
        names = [f"patterns/{kind}/{part}" for kind in ("patch", "cls") for part in ("density", "prototypes")]
        names += ["field_image_dx", "field_image_dy", "winft_masks"]
        steps += [lambda n=n: data.array_bytes(n) for n in names if n in arrays]
        steps += [lambda n=n, i=i: data.array_bytes(n, i) for n, i in (("attention_mean", f"{FIRST_LAYER},{FIRST_HEAD}"), ("interaction_mean", f"{FIRST_LAYER},{FIRST_QUERY}")) if n in arrays]
        first_id = _first_image_id(data)
        if first_id is not None:
            steps.append(lambda: data.image_png(first_id, OVERVIEW_IMAGE_SIZE))
    except Exception:  # noqa: BLE001 - a run this cannot read answers with errors on request instead
        pass
    for step in steps:
        if stop.is_set():
            return
        try:
            step()
        except Exception:  # noqa: BLE001 - the request that needs this answer reports the error
            pass


def _first_image_id(data: RunData) -> Optional[int]:
    """The images table's first image (the app's first selection), or None when there is none."""
    df = data.images
    return int(df["image_id"].iloc[0]) if len(df) else None


class FirstScreen:
    """The live answers for the app's first selection (:data:`FIRST_LAYER` ...), asked of the model
    as soon as the server starts.

    A fresh page's first live queries are these, and they wait for the model (partial pruning runs
    the model six times); asked at start-up, they are usually done when the page asks, and a page
    that asks earlier waits for the same computation instead of queueing a second one. The answers
    are kept for later pages. They are asked without a client id, so no tab's queries supersede
    them.
    """

    def __init__(self, data: RunData, live: LiveModel) -> None:
        self.data = data
        self.live = live
        self._tasks: dict[Hashable, asyncio.Future] = {}

    def start(self) -> None:
        """Queue the first selection's queries on the model worker (call inside the event loop)."""
        if not self.live.available:
            return
        try:
            iid = _first_image_id(self.data)
        except Exception:  # noqa: BLE001 - an unreadable images table: nothing to prepare
            return
        if iid is None:
            return
        self._tasks = {}
        queries: dict[Hashable, Any] = {
            ("attention", iid, FIRST_LAYER, FIRST_HEAD): self.live.attention(None, iid, FIRST_LAYER, FIRST_HEAD),
            ("interaction", iid, FIRST_LAYER, FIRST_QUERY): self.live.interaction(None, iid, FIRST_LAYER, FIRST_QUERY),
            ("partial_pruning", iid, FIRST_LAYER, FIRST_HEAD): self.live.partial_pruning(None, iid, FIRST_LAYER, FIRST_HEAD),
        }
        for key, query in queries.items():
            task = asyncio.ensure_future(query)
            # A failure is met again (and reported) by the request that asks; never log it here.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._tasks[key] = task

    @property
    def prepared(self) -> list[Hashable]:
        """The keys of the answers asked at start-up, e.g. ``("partial_pruning", image, 0, 0)``."""
        return list(self._tasks)

    async def answer(self, key: Hashable) -> Any:
        """The prepared answer for ``key`` (waiting for it if it is being computed), or None when
        there is none or it failed (the caller then asks the model itself)."""
        task = self._tasks.get(key)
        # One app may be served by several event loops in turn (a test client, then a server);
        # a task of another loop cannot be awaited here.
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            return None
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                return None
            raise
        except Exception:  # noqa: BLE001 - asked again on request, which reports the error
            return None

    def cancel(self) -> None:
        """Cancel the prepared queries still waiting (call inside the event loop that started them;
        those of another loop are that loop's to cancel)."""
        loop = asyncio.get_running_loop()
        for task in self._tasks.values():
            if task.get_loop() is loop:
                task.cancel()


def run_info(data: RunData, live: LiveModel) -> dict[str, Any]:
    """The ``/api/run`` answer: the manifest (without the per-image records) and what the run and
    the server can do."""
    from vitscope.analysis.importance import MODES

    m = data.manifest
    model = m.get("model", {})
    manifest = {**m, "images": {k: v for k, v in m.get("images", {}).items() if k != "records"}}
    tables = data.table_names()
    arrays = data.array_names()
    heads_cols = _columns(data, "heads") if "heads" in tables else []
    layout = dict(model.get("layout", {}))
    has_cls = layout.get("cls_index") is not None
    prep = model.get("preprocessing", {})
    input_size = prep.get("input_size") or [None, None, None]
    labels = False
    if "images" in tables:
        labels = bool(data.images["label"].notna().any()) if "label" in data.images.columns else False
    kinds: list[str] = []
    if "pattern_clusters" in tables:
        import pyarrow.parquet as pq

        col = pq.read_table(data.path / "pattern_clusters.parquet", columns=["kind"]).column("kind").to_pylist()
        kinds = [k for k in ("patch", "cls") if k in set(col)] + sorted(set(col) - {"patch", "cls"})
    return {
        "path": str(data.path),
        "manifest": manifest,
        "model": {
            "spec": model.get("spec"),
            "num_layers": model.get("num_layers"),
            "num_heads": model.get("num_heads"),
            "num_classes": model.get("num_classes"),
            "class_names": model.get("class_names") or m.get("images", {}).get("class_names") or [],
            "layout": layout,
            "image_size": list(input_size[1:3]),
        },
        "live": live.status(),
        "capabilities": {
            "cls": layout.get("cls_index") is not None,
            "labels": labels,
            "interactions": "interaction_layers" in tables,
            "winft": "winft_masks" in arrays,
            "pattern_kinds": kinds,
            "attention_mean": "attention_mean" in arrays,
        },
        "metrics": [c for c in heads_cols if f"{c}_lo" in heads_cols and f"{c}_hi" in heads_cols],
        "metric_labels": {c: metric_label(c) for c in heads_cols if f"{c}_lo" in heads_cols},
        "strength_measures": [c[: -len("_mean")] for c in heads_cols if c.endswith("_mean") and f"{c[:-5]}_median" in heads_cols],
        # the partial-pruning modes this model has (without a CLS token: 1, 2 and 4)
        "modes": [{"mode": i + 1, "region": r} for i, r in enumerate(MODES)
                  if has_cls or not r.startswith("cls")],  # fmt: skip
        "tables": tables,
        "arrays": arrays,
    }


def _columns(data: RunData, table: str) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.read_schema(data.path / f"{table}.parquet").names)


def _int(text: Optional[str], what: str) -> int:
    if text is None or not re.fullmatch(r"-?\d{1,9}", text.strip()):
        raise bad_parameter(f"{what} {text!r} is not an integer")
    return int(text)


def _client(client: Optional[str]) -> Optional[str]:
    if client is None or client == "":
        return None
    if not _CLIENT_RE.fullmatch(client):
        raise bad_parameter(f"client {client[:80]!r} is not a short id; use up to 64 letters, digits, '.', '_' or '-'")
    return client


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def app_for_run(
    run: Any,
    *,
    model: bool = True,
    weights: Optional[str] = None,
    device: str = "cpu",
    vit: Any = None,
    static_dir: Optional[Path] = None,
) -> FastAPI:
    """:func:`create_app` for ``run`` with its model loaded from the manifest when ``model``.

    ``vit`` (an already loaded model) skips loading; ``weights`` points at the model's weights
    when the manifest's spec alone cannot find them. A model that cannot be loaded leaves live
    queries off, with the reason in ``/api/run``'s ``live.reason``.
    """
    if not hasattr(run, "manifest"):
        from vitscope.store import open_run

        run = open_run(run)
    reason = warning = None
    if vit is None:
        from vitscope.server.live import load_live_model

        vit, reason, warning = load_live_model(run.manifest, weights=weights, device=device, enabled=model)
    return create_app(run, vit, live_reason=reason, live_warning=warning, static_dir=static_dir)

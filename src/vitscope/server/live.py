"""Live model queries: attention, partial pruning and patch interactions computed on demand.

All model work runs on one worker thread, one query at a time: PyTorch modules with vitscope's
attention runtime installed are not safe to run from several threads at once, and one query at a
time also keeps each query as fast as the machine allows. The HTTP endpoints await the worker
(they are ``async``), so requests for the run's own data are answered meanwhile by the server's
other threads.

Supersede: each query carries a ``client`` (one per browser tab) and an endpoint name. When a new
query arrives while an older one of the same client and endpoint is still waiting for the worker,
the older one is answered at once with ``409 superseded`` and never runs: clicking through heads
quickly costs one computation, not one per click. A query that has started always finishes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from vitscope.server.data import LRU, RunData
from vitscope.server.errors import ApiError, bad_parameter


class Superseded(ApiError):
    def __init__(self, endpoint: str) -> None:
        super().__init__(409, "superseded", f"a newer {endpoint} query of the same client replaced this one before it ran")


@dataclass
class _Job:
    future: "asyncio.Future[Any]"
    loop: asyncio.AbstractEventLoop
    started: bool = False
    dropped: bool = False
    created: float = field(default_factory=time.perf_counter)


class Worker:
    """One thread that runs model queries in order, with per-(client, endpoint) supersede."""

    def __init__(self) -> None:
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: dict[tuple[str, str], _Job] = {}
        self._lock = threading.Lock()

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The worker thread (started on first use, again after :meth:`shutdown`)."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitscope-live")
            return self._executor

    async def run(self, client: Optional[str], endpoint: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the worker thread and return its result (or raise its error)."""
        loop = asyncio.get_running_loop()
        job = _Job(future=loop.create_future(), loop=loop)
        key = (client, endpoint) if client else None
        if key is not None:
            with self._lock:
                old = self._pending.get(key)
                if old is not None and not old.started:
                    old.dropped = True
                    old.loop.call_soon_threadsafe(_settle, old.future, None, Superseded(endpoint))
                self._pending[key] = job

        def work() -> None:
            with self._lock:
                if job.dropped:
                    return
                job.started = True
            try:
                result, error = fn(), None
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting request
                result, error = None, e
            finally:
                if key is not None:
                    with self._lock:
                        if self._pending.get(key) is job:
                            del self._pending[key]
            loop.call_soon_threadsafe(_settle, job.future, result, error)

        self.executor.submit(work)
        try:
            return await job.future
        except asyncio.CancelledError:
            # The client went away: a query that has not started yet need not run at all.
            with self._lock:
                if not job.started:
                    job.dropped = True
                    if key is not None and self._pending.get(key) is job:
                        del self._pending[key]
            raise

    def shutdown(self) -> None:
        with self._lock:
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)


def _settle(fut: "asyncio.Future[Any]", result: Any, error: Optional[BaseException]) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class LiveModel:
    """The run's model, kept loaded for live queries on the run's images.

    ``vit`` is None when no model could be loaded; ``reason`` then says why and how to turn live
    queries on, and every query answers ``409 no_model`` with that reason.
    """

    def __init__(self, data: RunData, vit: Any = None, reason: Optional[str] = None, warning: Optional[str] = None) -> None:
        self.data = data
        self.vit = vit
        self.reason = None if vit is not None else (reason or "no model was given to the server")
        self.warning = warning
        self.worker = Worker()
        self._inputs = LRU(64)
        self._layer_maps = LRU(16)
        self._impacts = LRU(8)
        self._streams = LRU(8)

    @property
    def available(self) -> bool:
        return self.vit is not None

    def status(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "reason": self.reason,
            "device": str(self.vit.device) if self.vit is not None else None,
            "warning": self.warning,
            "endpoints": ["attention", "partial_pruning", "interaction"] if self.available else [],
        }

    # ----------------------------------------------------------- validation
    def _require(self) -> Any:
        if self.vit is None:
            raise ApiError(409, "no_model", f"live queries are off: {self.reason}")
        return self.vit

    def check_head(self, layer: int, head: int) -> None:
        m = self.data.manifest["model"]
        L, H = int(m["num_layers"]), int(m["num_heads"])
        if not 0 <= layer < L:
            raise bad_parameter(f"layer {layer} is out of range: the model has layers 0..{L - 1}")
        if not 0 <= head < H:
            raise bad_parameter(f"head {head} is out of range: the model has heads 0..{H - 1} in each layer")

    # ------------------------------------------------------- model inputs
    def _input(self, image_id: int) -> Any:
        """The preprocessed ``(1, C, H, W)`` tensor of image ``image_id`` (the model's own pipeline)."""
        self.data.image_path(image_id)  # 404 / 409 at once

        def make() -> Any:
            # decoded from its file or from inside its container (409 when unreadable)
            return self.vit.preprocess([self.data.decoded_image(image_id)])

        return self._inputs.get(int(image_id), make)

    def target(self, image_id: int) -> Optional[int]:
        """The image's label, or None when it has none (the prediction is used then)."""
        label = self.data.image_row(image_id)["label"]
        try:
            import pandas as pd

            return None if pd.isna(label) else int(label)
        except (TypeError, ValueError):
            return None

    # ---------------------------------------------------------------- queries
    async def attention(self, client: Optional[str], image_id: int, layer: int, head: int) -> np.ndarray:
        """``vit.attention(x)[0, layer, head]`` as float32 ``(T, T)``; only blocks ``0..layer`` run."""
        self._require()  # 409 without a model, before anything is queued
        self.check_head(layer, head)
        self.data.image_path(image_id)  # 404 / 409 before queueing

        def compute() -> np.ndarray:
            maps = self._layer_maps.get((int(image_id), int(layer)), lambda: self._layer_attention(image_id, layer))
            return maps[head]

        return await self.worker.run(client, "attention", compute)

    def _residual_streams(self, x: Any) -> list[Any]:
        """The residual stream entering every block for one image (one forward, kept per image), so
        that a head's partial pruning runs only the blocks from its layer on."""
        import torch

        with torch.no_grad():
            h = self.vit.embed(x)
            streams = [h]
            self.vit.run_blocks(h, 0, self.vit.num_layers - 1, on_block=lambda _i, out: streams.append(out))
        return streams

    def _layer_attention(self, image_id: int, layer: int) -> np.ndarray:
        x = self._input(image_id)
        for got, attn in self.vit.iter_attention(x, layers=[layer]):
            if got == layer:
                return attn[0].float().cpu().numpy().copy()
        raise RuntimeError(f"layer {layer} produced no attention map")

    async def partial_pruning(self, client: Optional[str], image_id: int, layer: int, head: int) -> dict[str, Any]:
        """The six partial-pruning modes of one head on one image (``vitscope.partial_pruning``)."""
        vit = self._require()
        self.check_head(layer, head)
        self.data.image_path(image_id)
        label = self.target(image_id)

        def compute() -> dict[str, Any]:
            from vitscope.analysis.importance import partial_pruning

            t0 = time.perf_counter()
            x = self._input(image_id)
            stream = self._streams.get(int(image_id), lambda: self._residual_streams(x))[layer]
            df = partial_pruning(vit, x[0], layer, head, label=label, stream=stream)
            return partial_pruning_json(df, image_id, layer, head, vit.class_names, elapsed_ms=1000 * (time.perf_counter() - t0))

        return await self.worker.run(client, "partial_pruning", compute)

    async def interaction(self, client: Optional[str], image_id: int, layer: int, query: int) -> np.ndarray:
        """First-order interaction of every key patch on patch ``query`` in ``layer``, float32 ``(P,)``."""
        vit = self._require()
        self.check_head(layer, 0)
        P = int(vit.layout.num_patches)
        if not 0 <= query < P:
            raise bad_parameter(f"query patch {query} is out of range: the image has patches 0..{P - 1} (row-major over the patch grid)")
        self.data.image_path(image_id)
        label = self.target(image_id)

        def compute() -> np.ndarray:
            impact = self._impacts.get(int(image_id), lambda: self._impact(image_id, label))
            return impact[layer, query]

        return await self.worker.run(client, "interaction", compute)

    def _impact(self, image_id: int, label: Optional[int]) -> np.ndarray:
        from vitscope.analysis.interaction import first_order_impact

        out = first_order_impact(self.vit, self._input(image_id), targets=[-1 if label is None else label])
        return out["impact"][0]  # (L, P, P)

    def shutdown(self) -> None:
        self.worker.shutdown()


def partial_pruning_json(df: Any, image_id: int, layer: int, head: int, class_names: Optional[list[str]], elapsed_ms: float) -> dict[str, Any]:
    """The ``/api/live/partial_pruning`` answer (docs/api.md) from ``vitscope.partial_pruning``'s frame."""
    label = int(df["label"].iloc[0])
    modes = []
    for _, r in df.iterrows():
        names = list(r["top_names"]) if "top_names" in r and r["top_names"] is not None else [None] * len(r["top_classes"])
        modes.append(
            {
                "mode": int(r["mode"]),
                "region": str(r["region"]),
                "label_prob": float(r["label_prob"]),
                "top": [
                    {"class": int(c), "name": None if n is None else str(n), "prob": float(p)}
                    for c, n, p in zip(r["top_classes"], names, r["top_probs"])
                ],
            }
        )
    return {
        "image_id": int(image_id),
        "layer": int(layer),
        "head": int(head),
        "label": label,
        "label_name": class_names[label] if class_names and 0 <= label < len(class_names) else None,
        "modes": modes,
        "elapsed_ms": round(float(elapsed_ms), 3),
    }


def load_live_model(
    manifest: dict[str, Any],
    *,
    weights: Optional[str] = None,
    device: str = "cpu",
    enabled: bool = True,
) -> tuple[Any, Optional[str], Optional[str]]:
    """Load the run's model for live queries: ``(vit or None, reason when None, warning)``.

    The model is the manifest's ``model.spec``, with ``weights`` (``--weights``) or the weights
    path the manifest records (``model.weights``), if any. Nothing here raises: a model that cannot
    be loaded gives a reason that says how to turn live queries on.
    """
    if not enabled:
        return None, "the server was started with --no-model; restart it without --no-model to compute attention and pruning live", None
    model = manifest.get("model", {})
    spec = model.get("spec")
    if manifest.get("synthetic"):
        return None, "this run is synthetic (written by scripts/make_synthetic_run.py without a model), so there is no model to query", None
    if not spec:
        return None, "the run's manifest names no model (model.spec); rerun the analysis with a current vitscope", None
    w = weights or model.get("weights") or model.get("weights_path")
    if w is not None and not Path(w).is_file():
        return None, f"weights file {w} not found; pass --weights PATH to the model's weights", None
    from vitscope.models import load_model

    try:
        vit = load_model(spec, weights=w, device=device)
    except Exception as e:  # noqa: BLE001 - any load failure turns live queries off, with its reason
        hint = "pass --weights PATH to the model's weights file" if w is None else "check --weights"
        return None, f"model {spec!r} could not be loaded ({type(e).__name__}: {e}); {hint}", None
    warning = None
    want = model.get("weights_sha256")
    if want and vit.weights_sha256 and want != vit.weights_sha256:
        warning = (
            f"the loaded weights (sha256 {vit.weights_sha256[:12]}) differ from the run's ({want[:12]}); "
            "live answers will not match the run's tables"
        )
    return vit, None, warning

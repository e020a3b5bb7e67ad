"""The web app's server (docs/api.md): every endpoint against the run's own files and the model.

References are independent of the server: tables are compared with ``pandas.read_parquet``, arrays
with the zarr arrays read directly, images with the model's own preprocessing, live answers with
``vit.attention``, ``vitscope.partial_pruning`` and ``first_order_impact`` called directly.
"""

from __future__ import annotations

import http.client
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import zarr
from fastapi.testclient import TestClient
from PIL import Image

import vitscope

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def vit():
    return vitscope.load_model("fmnist_vit_tiny", device="cpu")


@pytest.fixture(scope="module")
def app(server_run, vit):
    from vitscope.server.app import create_app

    return create_app(server_run, vit)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def live_server(app):
    """The same app on a real uvicorn server on a free port."""
    from vitscope.server.runner import BackgroundServer

    srv = BackgroundServer(app, "127.0.0.1", 0).start()
    yield srv
    srv.stop()


def _ipc(content: bytes) -> pd.DataFrame:
    return pa.ipc.open_stream(content).read_all().to_pandas()


def _nd(resp) -> np.ndarray:
    shape = tuple(int(s) for s in resp.headers["X-Vitscope-Shape"].split(",") if s)
    return np.frombuffer(resp.content, dtype=np.dtype(resp.headers["X-Vitscope-Dtype"]).newbyteorder("<")).reshape(shape)


def _error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    body = resp.json()
    assert set(body) == {"error", "detail"} and body["detail"], body
    if code is not None:
        assert body["error"] == code, body
    return body


# --------------------------------------------------------------------------- /api/run
def test_run_describes_run_and_capabilities(client, server_run):
    info = client.get("/api/run").json()
    assert info["path"] == str(server_run.path)
    assert "records" not in info["manifest"]["images"] and info["manifest"]["counts"]["analysed"] == 16
    assert info["model"]["num_layers"] == 6 and info["model"]["num_heads"] == 4 and info["model"]["image_size"] == [28, 28]
    assert info["model"]["layout"]["num_tokens"] == server_run.manifest["model"]["layout"]["num_tokens"]
    assert info["model"]["class_names"][9] == "Ankle boot"
    assert info["live"]["available"] is True and info["live"]["reason"] is None
    assert sorted(info["tables"]) == sorted(p.stem for p in server_run.path.glob("*.parquet"))
    assert sorted(info["arrays"]) == sorted(server_run.arrays())
    assert {"acc_drop", "prob_drop", "loss_increase", "taylor"} <= set(info["metrics"])
    assert all(f"{m}_lo" in server_run.heads.columns for m in info["metrics"])
    assert {"entropy", "mean_distance", "cls_to_patch"} <= set(info["strength_measures"])
    assert [m["region"] for m in info["modes"]] == ["none", "all", "cls", "patch", "cls_cross", "cls_self"]
    caps = info["capabilities"]
    assert caps["cls"] is True and caps["labels"] is True and caps["interactions"] is False and caps["winft"] is False
    assert caps["pattern_kinds"] == ["patch", "cls"] and caps["attention_mean"] is True


# --------------------------------------------------------------------------- tables
def test_every_table_decodes_to_the_parquet_frame(client, server_run):
    for path in sorted(server_run.path.glob("*.parquet")):
        r = client.get(f"/api/table/{path.stem}")
        assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.apache.arrow.stream"
        pd.testing.assert_frame_equal(_ipc(r.content), pd.read_parquet(path))


def test_table_columns_and_errors(client, server_run):
    r = client.get("/api/table/image_heads", params={"columns": "image_id,layer,head,entropy,hop_profile"})
    want = pd.read_parquet(server_run.path / "image_heads.parquet", columns=["image_id", "layer", "head", "entropy", "hop_profile"])
    got = _ipc(r.content)
    pd.testing.assert_frame_equal(got, want)
    assert isinstance(got["hop_profile"].iloc[0], np.ndarray)  # list columns stay lists
    assert "nope" in _error(client.get("/api/table/nope"), 404, "not_found")["detail"]
    assert "zzz" in _error(client.get("/api/table/heads", params={"columns": "layer,zzz"}), 404)["detail"]
    _error(client.get("/api/table/heads", params={"columns": "layer,,head"}), 400, "bad_parameter")
    _error(client.get("/api/table/manifest"), 404)


# --------------------------------------------------------------------------- arrays
def test_arrays_and_slices_equal_zarr(client, server_run):
    root = server_run.path / "arrays.zarr"
    for name in server_run.arrays():
        z = zarr.open_array(str(root / name), mode="r")
        r = client.get(f"/api/array/{name}")
        assert r.status_code == 200, name
        got = _nd(r)
        assert got.shape == z.shape
        np.testing.assert_array_equal(got, z[...].astype(got.dtype))
        assert json.loads(r.headers["X-Vitscope-Attrs"]) == json.loads(json.dumps(dict(z.attrs)))
        if z[...].dtype == np.float16:
            assert r.headers["X-Vitscope-Dtype"] == "float32"
    z = zarr.open_array(str(root / "attention_mean"), mode="r")
    one = _nd(client.get("/api/array/attention_mean", params={"index": "2,3"}))
    np.testing.assert_array_equal(one, z[2, 3])
    last = _nd(client.get("/api/array/attention_mean", params={"index": "-1"}))
    np.testing.assert_array_equal(last, z[-1])
    cell = client.get("/api/array/attention_mean", params={"index": "0,0,0,0"})
    assert cell.headers["X-Vitscope-Shape"] == "" and _nd(cell) == z[0, 0, 0, 0]
    codes = zarr.open_array(str(root / "patterns/patch/cluster"), mode="r")
    got = client.get("/api/array/patterns/patch/cluster", params={"index": "3"})
    assert got.headers["X-Vitscope-Dtype"] == "int32"
    np.testing.assert_array_equal(_nd(got), codes[3])


@pytest.mark.parametrize(
    "index,fragment",
    [("6", "out of range"), ("-7", "out of range"), ("a", "not an integer"), ("1.5", "not an integer"), ("0,0,0,0,0", "axes"), ("0,,1", "not an integer")],
)
def test_array_bad_index_is_400(client, index, fragment):
    assert fragment in _error(client.get("/api/array/attention_mean", params={"index": index}), 400, "bad_parameter")["detail"]


def test_unknown_array_is_404(client):
    for name in ("nope", "patterns", "patterns/patch", "patterns/patch/zarr.json", "..%2fmanifest.json"):
        _error(client.get(f"/api/array/{name}"), 404)


# --------------------------------------------------------------------------- images
def test_image_is_what_the_model_sees(client, server_run, vit):
    prep = vit.preprocessing
    mean = torch.tensor(prep.mean)[:, None, None]
    std = torch.tensor(prep.std)[:, None, None]
    for _, row in server_run.images.head(4).iterrows():
        r = client.get(f"/api/image/{int(row['image_id'])}.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        got = np.asarray(Image.open(io.BytesIO(r.content)))
        x = vit.preprocess([row["path"]])[0]  # the model's own pipeline, normalised
        want = ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)[0].numpy()
        assert got.shape == tuple(prep.input_size[1:])
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        big = np.asarray(Image.open(io.BytesIO(client.get(f"/api/image/{int(row['image_id'])}.png", params={"size": 112}).content)))
        np.testing.assert_array_equal(big, np.repeat(np.repeat(got, 4, axis=0), 4, axis=1))


def test_model_view_resizes_and_crops_like_torchvision(tmp_path):
    """The geometry on a non-square photo-like image equals torchvision's Resize + CenterCrop."""
    from torchvision import transforms

    from vitscope.models.preprocessing import Preprocessing
    from vitscope.server.data import model_view

    rng = np.random.default_rng(0)
    arr = (rng.random((300, 420, 3)) * 255).astype(np.uint8)
    path = tmp_path / "wide.png"
    Image.fromarray(arr).save(path)
    prep = Preprocessing(input_size=(3, 224, 224), mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), interpolation="bicubic", resize=256, crop=(224, 224))
    tv = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(224)])
    want = np.asarray(tv(Image.open(path).convert("RGB")))
    got = np.asarray(model_view(prep, path))
    assert got.shape == (224, 224, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_image_errors(client, server_run, tmp_path):
    _error(client.get("/api/image/999.png"), 404, "not_found")
    _error(client.get("/api/image/abc.png"), 400, "bad_parameter")
    _error(client.get("/api/image/3.jpg"), 404)
    _error(client.get("/api/image/3.png", params={"size": 0}), 400)
    _error(client.get("/api/image/3.png", params={"size": "big"}), 400)
    _error(client.get("/api/image/3.png", params={"size": 100000}), 400)

    # A run whose image file is gone answers 409 image_missing (not 500).
    from vitscope.server.app import create_app

    copy = tmp_path / "moved"
    shutil.copytree(server_run.path, copy)
    images = pd.read_parquet(copy / "images.parquet")
    images.loc[images["image_id"] == 3, "path"] = str(tmp_path / "gone" / "x.png")
    images.to_parquet(copy / "images.parquet", index=False)
    with TestClient(create_app(copy)) as c:
        assert "x.png" in _error(c.get("/api/image/3.png"), 409, "image_missing")["detail"]
        assert c.get("/api/image/2.png").status_code == 200


# --------------------------------------------------------------------------- live queries
def _label(run, image_id: int):
    v = run.images.set_index("image_id").loc[image_id, "label"]
    return None if pd.isna(v) else int(v)


def _pp_reference(vit, run, image_id, layer, head) -> pd.DataFrame:
    path = run.images.set_index("image_id").loc[image_id, "path"]
    return vitscope.partial_pruning(vit, path, layer, head, label=_label(run, image_id))


def _assert_pp_equal(got: dict, want: pd.DataFrame, image_id, layer, head, tol=1e-6):
    assert (got["image_id"], got["layer"], got["head"]) == (image_id, layer, head)
    assert got["label"] == int(want["label"].iloc[0])
    assert [m["mode"] for m in got["modes"]] == list(want["mode"])
    assert [m["region"] for m in got["modes"]] == list(want["region"])
    np.testing.assert_allclose([m["label_prob"] for m in got["modes"]], want["label_prob"], atol=tol)
    for m, (_, w) in zip(got["modes"], want.iterrows()):
        assert [t["class"] for t in m["top"]] == list(w["top_classes"])
        assert [t["name"] for t in m["top"]] == list(w["top_names"])
        np.testing.assert_allclose([t["prob"] for t in m["top"]], w["top_probs"], atol=tol)


def test_live_attention_equals_vit_attention(client, server_run, vit):
    ids = server_run.images["image_id"].tolist()
    for image_id, layer, head in [(ids[0], 0, 0), (ids[3], 3, 2), (ids[5], 5, 3), (ids[3], 3, 1)]:
        r = client.get(f"/api/live/attention/{image_id}/{layer}/{head}")
        assert r.status_code == 200 and r.headers["X-Vitscope-Dtype"] == "float32"
        path = server_run.images.set_index("image_id").loc[image_id, "path"]
        want = vit.attention(vit.preprocess([path]))[0, layer, head].numpy()
        got = _nd(r)
        assert got.shape == (vit.num_tokens, vit.num_tokens)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_live_partial_pruning_equals_library(client, server_run, vit):
    ids = server_run.images["image_id"].tolist()
    for image_id, layer, head in [(ids[0], 0, 1), (ids[7], 4, 3)]:
        got = client.get(f"/api/live/partial_pruning/{image_id}/{layer}/{head}").json()
        _assert_pp_equal(got, _pp_reference(vit, server_run, image_id, layer, head), image_id, layer, head)
        assert got["label_name"] == vit.class_names[got["label"]] and got["elapsed_ms"] > 0


def test_live_interaction_equals_first_order_impact(client, server_run, vit):
    from vitscope.analysis.interaction import first_order_impact

    image_id = int(server_run.images["image_id"].iloc[2])
    path = server_run.images.set_index("image_id").loc[image_id, "path"]
    want = first_order_impact(vit, vit.preprocess([path]), targets=[_label(server_run, image_id)])["impact"][0]
    for layer, query in [(0, 0), (2, 10), (5, vit.layout.num_patches - 1)]:
        got = _nd(client.get(f"/api/live/interaction/{image_id}/{layer}/{query}"))
        assert got.shape == (vit.layout.num_patches,)
        np.testing.assert_allclose(got, want[layer, query], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "url,status",
    [
        ("/api/live/attention/0/6/0", 400),
        ("/api/live/attention/0/0/4", 400),
        ("/api/live/attention/0/-1/0", 400),
        ("/api/live/attention/0/x/0", 400),
        ("/api/live/attention/999/0/0", 404),
        ("/api/live/attention/abc/0/0", 400),
        ("/api/live/partial_pruning/0/0/99", 400),
        ("/api/live/partial_pruning/0/0/0?client=" + "x" * 200, 400),
        ("/api/live/partial_pruning/0/0/0?client=a%20b", 400),
        ("/api/live/interaction/0/0/49", 400),
        ("/api/live/interaction/0/9/0", 400),
        ("/api/live/attention/0/0", 404),
        ("/api/nothing", 404),
        ("/api/table/", 404),
        ("/api/image/.png", 400),
        ("/api/image/99999999999999999999.png", 400),
    ],
)
def test_bad_requests_are_4xx_json(client, url, status):
    _error(client.get(url), status)


def test_post_is_405_json(client):
    _error(client.post("/api/run"), 405, "method_not_allowed")


def test_without_model_live_queries_say_why(server_run):
    from vitscope.server.app import app_for_run
    from vitscope.server.live import load_live_model

    with TestClient(app_for_run(server_run, model=False)) as c:
        live = c.get("/api/run").json()["live"]
        assert live["available"] is False and "--no-model" in live["reason"]
        for url in ("/api/live/attention/0/0/0", "/api/live/partial_pruning/0/0/0", "/api/live/interaction/0/0/0"):
            assert "--no-model" in _error(c.get(url), 409, "no_model")["detail"]
        assert c.get("/api/table/heads").status_code == 200  # the rest of the app still works
    vit, reason, _ = load_live_model(server_run.manifest, weights="/nonexistent/w.safetensors")
    assert vit is None and "--weights" in reason and "/nonexistent/w.safetensors" in reason
    bad = {**server_run.manifest, "model": {**server_run.manifest["model"], "spec": "no_such_model_xyz"}}
    vit, reason, _ = load_live_model(bad)
    assert vit is None and "no_such_model_xyz" in reason and "--weights" in reason


# --------------------------------------------------------------------------- concurrency
def test_concurrent_clients_get_their_own_answers(live_server, server_run, vit):
    ids = server_run.images["image_id"].tolist()
    queries = [(ids[i % len(ids)], i % 6, (i * 3) % 4) for i in range(12)]
    want = {q: _pp_reference(vit, server_run, *q) for q in queries}
    want_attn = {q: vit.attention(vit.preprocess([server_run.images.set_index("image_id").loc[q[0], "path"]]))[0, q[1], q[2]].numpy() for q in queries[:6]}
    errors: list[BaseException] = []

    def tab(k: int) -> None:
        try:
            with httpx.Client(base_url=live_server.url, timeout=60) as c:
                for j, q in enumerate(queries[k::4] + queries[: (k + 1)]):
                    r = c.get(f"/api/live/partial_pruning/{q[0]}/{q[1]}/{q[2]}", params={"client": f"tab{k}"})
                    assert r.status_code == 200, r.text
                    _assert_pp_equal(r.json(), want[q], *q)
                    if q in want_attn:
                        a = c.get(f"/api/live/attention/{q[0]}/{q[1]}/{q[2]}", params={"client": f"tab{k}"})
                        np.testing.assert_allclose(_nd(a), want_attn[q], atol=1e-6)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=tab, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_slow_query_does_not_block_static_views_and_newer_supersedes(live_server, app, server_run, vit):
    # Occupy the model worker for a while, as a slow query would (long enough that static requests
    # waiting for it would show: they would take over 2 s).
    busy = app.state.live.worker.executor.submit(time.sleep, 3.0)
    ids = server_run.images["image_id"].tolist()
    results: dict[str, httpx.Response] = {}

    def ask(name: str, client: str, q) -> None:
        with httpx.Client(base_url=live_server.url, timeout=60) as c:
            results[name] = c.get(f"/api/live/partial_pruning/{q[0]}/{q[1]}/{q[2]}", params={"client": client})

    old_q, new_q, other_q = (ids[1], 1, 1), (ids[2], 2, 2), (ids[4], 3, 0)
    t_old = threading.Thread(target=ask, args=("old", "tabA", old_q))
    t_old.start()
    time.sleep(0.3)
    t_other = threading.Thread(target=ask, args=("other", "tabB", other_q))
    t_other.start()
    time.sleep(0.3)
    t_new = threading.Thread(target=ask, args=("new", "tabA", new_q))
    t_new.start()

    # While the worker is busy, the run's data is served at once.
    t0 = time.perf_counter()
    with httpx.Client(base_url=live_server.url, timeout=10) as c:
        assert c.get("/api/table/image_heads").status_code == 200
        assert c.get("/api/array/attention_mean", params={"index": "0,0"}).status_code == 200
        assert c.get("/api/run").status_code == 200
    static_s = time.perf_counter() - t0
    # Answered while the worker was still busy: they did not wait for it (the bound is loose, so a
    # slow machine does not fail it; waiting would take over 2 s).
    assert not busy.done(), f"static requests took {static_s:.2f} s: they waited for the busy model worker"
    assert static_s < 2.0, f"static requests took {static_s:.2f} s while the model was busy"

    t_old.join(5)
    assert not t_old.is_alive() and not busy.done(), "the superseded query was not answered before the worker freed up"
    assert _error(results["old"], 409, "superseded")
    for t in (t_new, t_other):
        t.join(60)
    _assert_pp_equal(results["new"].json(), _pp_reference(vit, server_run, *new_q), *new_q)
    _assert_pp_equal(results["other"].json(), _pp_reference(vit, server_run, *other_q), *other_q)


# --------------------------------------------------------------------------- static files and traversal
@pytest.fixture(scope="module")
def static_server(server_run, tmp_path_factory):
    from vitscope.server.app import create_app
    from vitscope.server.runner import BackgroundServer

    root = tmp_path_factory.mktemp("site")
    static = root / "static"
    (static / "assets").mkdir(parents=True)
    (static / "index.html").write_text("<!doctype html><title>app</title>")
    (static / "assets" / "app.js").write_text("console.log('app')")
    (static / ".hidden").write_text("SECRET-HIDDEN")
    (root / "secret.txt").write_text("SECRET-OUTSIDE")
    (static / "assets" / "link.txt").symlink_to(root / "secret.txt")
    srv = BackgroundServer(create_app(server_run, static_dir=static), "127.0.0.1", 0).start()
    yield srv, root
    srv.stop()


def _raw_get(url: str, path: str) -> tuple[int, bytes, str]:
    """GET ``path`` exactly as written (no client-side normalisation or encoding)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=False, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read(), r.getheader("content-type") or ""
    finally:
        conn.close()


def test_app_files_are_served(static_server):
    srv, _ = static_server
    status, body, ctype = _raw_get(srv.url, "/")
    assert status == 200 and b"<title>app</title>" in body and ctype.startswith("text/html")
    status, body, ctype = _raw_get(srv.url, "/assets/app.js")
    assert status == 200 and body == b"console.log('app')" and "javascript" in ctype


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/assets/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2e%2e%2fsecret.txt",
        "/assets/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/assets/%2E%2E/%2E%2E/secret.txt",
        "/%252e%252e%252fsecret.txt",
        "/assets/%252e%252e/%252e%252e/secret.txt",
        "/..%5csecret.txt",
        "/assets/..\\..\\secret.txt",
        "/%5c..%5c..%5csecret.txt",
        "//secret.txt",
        "/assets//../../secret.txt",
        "/.hidden",
        "/assets/link.txt",
        "/etc/passwd",
        "/%2fetc%2fpasswd",
        "//etc/passwd",
        "/C:/secret.txt",
        "/assets/app.js%00.txt",
        "/api/table/..%2fmanifest",
        "/api/table/%2e%2e%2f%2e%2e%2fsecret",
        "/api/array/..%2f..%2fmanifest.json",
        "/api/array/%2e%2e/%2e%2e/manifest.json",
        "/api/image/..%2f..%2fmanifest.json",
        "/manifest.json",
        "/images.parquet",
    ],
)
def test_path_traversal_is_refused(static_server, path):
    srv, root = static_server
    status, body, ctype = _raw_get(srv.url, path)
    assert 400 <= status < 500, (path, status)
    assert b"SECRET" not in body and b"root:" not in body and b"vitscope-run" not in body
    assert ctype.startswith("application/json")
    assert set(json.loads(body)) == {"error", "detail"}
    # An absolute path on the server machine is no path at all.
    status, body, _ = _raw_get(srv.url, "/" + str(root / "secret.txt").lstrip("/"))
    assert status == 404 and b"SECRET" not in body


def test_unbuilt_app_says_how_to_build(server_run, tmp_path):
    from vitscope.server.app import create_app

    with TestClient(create_app(server_run, static_dir=tmp_path / "none")) as c:
        r = c.get("/")
        assert r.status_code == 503 and "setup.sh" in r.text and "vite build" in r.text
        assert c.get("/api/run").status_code == 200


# --------------------------------------------------------------------------- commands and show()
def test_show_starts_reuses_and_stops_a_server(server_run):
    from vitscope.server import notebook

    try:
        import IPython  # noqa: F401

        has_ipython = True
    except ImportError:
        has_ipython = False
    try:
        shown = vitscope.show(server_run.path, model=False)
        url = notebook.url(server_run.path)
        assert url is not None and url.startswith("http://127.0.0.1:")
        if has_ipython:
            assert shown.src == url
        else:
            assert shown == url
        with httpx.Client(timeout=10) as c:
            info = c.get(url + "api/run").json()
        assert info["path"] == str(server_run.path) and info["live"]["available"] is False
        assert vitscope.show(str(server_run.path), model=False) == shown or has_ipython  # reused
        assert notebook.url(server_run.path) == url
    finally:
        notebook.stop(server_run.path)
    assert notebook.url(server_run.path) is None
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "api/run", timeout=2)


# --------------------------------------------------------------------------- synthetic run
def test_synthetic_run_is_a_valid_run_with_the_real_columns(server_run, tmp_path):
    from vitscope.server.app import create_app

    out = tmp_path / "synthetic"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_synthetic_run.py"), str(out), "--images", "12", "--layers", "3", "--heads", "2", "--grid", "4", "--seed", "1"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    syn = vitscope.open_run(out)
    assert len(syn.images) == 12 and len(syn.heads) == 6 and len(syn.image_heads) == 12 * 6
    for table in ("images", "heads", "image_heads", "curves", "agreement", "patterns", "pattern_clusters"):
        real_cols = set(pd.read_parquet(server_run.path / f"{table}.parquet").columns)
        syn_cols = set(pd.read_parquet(out / f"{table}.parquet").columns)
        assert real_cols <= syn_cols, (table, real_cols - syn_cols)
    assert set(server_run.arrays()) <= set(syn.arrays()), set(server_run.arrays()) - set(syn.arrays())
    assert syn.array("attention_mean").shape == (3, 2, 17, 17)
    assert len(syn.patterns["patch"].maps) == 12 * 6 and len(syn.patterns["cls"].maps) == 12 * 6
    with TestClient(create_app(syn)) as c:
        info = c.get("/api/run").json()
        assert info["model"]["layout"]["num_tokens"] == 17 and info["model"]["num_layers"] == 3
        assert c.get("/api/image/0.png").status_code == 200
        for name in info["tables"]:
            assert c.get(f"/api/table/{name}").status_code == 200


# --------------------------------------------------------------------------- packaging
def _repo_copy(dest: Path, with_app: bool) -> Path:
    """The repository's files (as git sees them, without node_modules) copied to ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True, capture_output=True
    ).stdout.decode().split("\0")
    for f in files:
        src = REPO / f
        if f and src.is_file() and not f.startswith("web/node_modules/"):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    if with_app:
        shutil.copytree(REPO / "src/vitscope/server/static", dest / "src/vitscope/server/static")
    return dest


def _pip_wheel(src: Path, out: Path) -> subprocess.CompletedProcess:
    # No PATH: npm is unreachable, as on a machine without node.
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-build-isolation", "--no-deps", "--no-index", "-w", str(out)],
        cwd=src, env={"PATH": "/nonexistent", "HOME": str(out)}, capture_output=True, text=True, timeout=300,
    )


def test_wheel_contains_the_built_app_and_refuses_to_build_without_it(tmp_path):
    import zipfile

    assert (REPO / "src/vitscope/server/static/index.html").is_file(), "build the web app first: bash scripts/setup.sh"
    src = _repo_copy(tmp_path / "with", with_app=True)
    # Mark the copied app as built from the copied sources, so the build does not rebuild it.
    import runpy

    stamp = runpy.run_path(str(src / "setup.py"), run_name="vitscope_setup")["web_sources_hash"]()
    (src / "web/.setup-stamp").write_text(stamp + "\n")
    res = _pip_wheel(src, tmp_path / "wheel")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("vitscope-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vitscope/server/static/index.html" in names
    built = {str(p.relative_to(REPO / "src")) for p in (REPO / "src/vitscope/server/static").rglob("*") if p.is_file()}
    assert built <= set(names), built - set(names)

    bare = _repo_copy(tmp_path / "without", with_app=False)
    res = _pip_wheel(bare, tmp_path / "wheel2")
    assert res.returncode != 0 and not list((tmp_path / "wheel2").glob("*.whl"))
    out = " ".join((res.stdout + res.stderr).split())
    assert "web app is not built" in out and "npm" in out and "setup.sh" in out


def test_a_run_made_with_a_weights_file_is_served_live_without_weights(tmp_path):
    """`analyze -w FILE` records the file in the manifest, so `serve RUN` finds the same weights."""
    from vitscope.pipeline import AnalyzeSettings
    from vitscope.models.builtin import BUILTIN_MODELS
    from vitscope.server.live import load_live_model

    file = tmp_path / "weights.safetensors"
    file.write_bytes(BUILTIN_MODELS["fmnist_vit_tiny"].weights_path.read_bytes())
    vit = vitscope.load_model("fmnist_vit_tiny", weights=file, device="cpu")
    assert vit.weights_path == str(file.resolve())
    settings = AnalyzeSettings(batch_size=4, n_boot=5, curve_images=2, curve_points=2, ae_epochs=1, ae_min_steps=2, projection="pca", n_clusters=2)
    run = vitscope.analyze(vit, "sample", tmp_path / "run", limit=4, settings=settings, device="cpu", progress=False)
    assert run.manifest["model"]["weights"] == str(file.resolve())
    live, reason, _ = load_live_model(run.manifest)
    assert live is not None, reason
    assert live.weights_sha256 == vit.weights_sha256
    file.unlink()
    live, reason, _ = load_live_model(run.manifest)
    assert live is None and str(file.resolve()) in reason and "--weights" in reason


# --------------------------------------------------------------------------- first load
def test_lru_computes_a_key_once_for_concurrent_callers_and_keeps_no_failure():
    from vitscope.server.data import LRU

    cache, calls, got = LRU(2), [], []
    gate = threading.Event()

    def slow() -> str:
        calls.append(1)
        gate.wait(10)
        return "A"

    threads = [threading.Thread(target=lambda: got.append(cache.get("a", slow))) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(10)
    assert got == ["A"] * 4 and len(calls) == 1
    with pytest.raises(ValueError, match="broken"):
        cache.get("b", lambda: (_ for _ in ()).throw(ValueError("broken")))
    assert cache.get("b", lambda: "B") == "B"


def test_start_up_work_answers_byte_for_byte_as_on_request(server_run, vit):
    """The answers the server prepares when it starts (the first screen's) are the ones computed on
    request, and the first selection's live answers are the library's."""
    from vitscope.server.app import create_app

    first = int(server_run.images["image_id"].iloc[0])
    tables = ["images", "heads", "image_heads", "curves", "agreement", "patterns", "pattern_clusters"]
    urls = ["/api/run"] + [f"/api/table/{t}" for t in tables if (server_run.path / f"{t}.parquet").exists()]
    urls += ["/api/array/patterns/patch/density", "/api/array/patterns/cls/prototypes", "/api/array/attention_mean?index=0,0"]
    urls += [f"/api/image/{first}.png?size=176", f"/api/live/attention/{first}/0/0", f"/api/live/interaction/{first}/0/0"]
    with TestClient(create_app(server_run, vit, warm=False)) as cold:
        want = {u: cold.get(u) for u in urls}
        want_pp = cold.get(f"/api/live/partial_pruning/{first}/0/0").json()
    app = create_app(server_run, vit)
    with TestClient(app) as warm:
        assert app.state.warmed.wait(60), "the start-up work did not finish"
        assert sorted(k[0] for k in app.state.first_screen.prepared) == ["attention", "interaction", "partial_pruning"]
        for u in urls:
            r = warm.get(u)
            assert r.status_code == 200 and r.content == want[u].content, u
            for h in ("content-type", "x-vitscope-dtype", "x-vitscope-shape", "x-vitscope-attrs"):
                assert r.headers.get(h) == want[u].headers.get(h), (u, h)
        _assert_pp_equal(warm.get(f"/api/live/partial_pruning/{first}/0/0").json(), _pp_reference(vit, server_run, first, 0, 0), first, 0, 0)
        _assert_pp_equal(want_pp, _pp_reference(vit, server_run, first, 0, 0), first, 0, 0)
        # A query the start-up work did not prepare is asked of the model as before.
        other = int(server_run.images["image_id"].iloc[1])
        _assert_pp_equal(warm.get(f"/api/live/partial_pruning/{other}/1/2").json(), _pp_reference(vit, server_run, other, 1, 2), other, 1, 2)


def test_array_answers_are_kept_per_parsed_index(client, server_run):
    a, b = client.get("/api/array/attention_mean", params={"index": "1,2"}), client.get("/api/array/attention_mean", params={"index": " 1, 2 "})
    assert a.status_code == b.status_code == 200 and a.content == b.content
    np.testing.assert_array_equal(_nd(a), zarr.open_array(str(server_run.path / "arrays.zarr" / "attention_mean"), mode="r")[1, 2])


def test_index_page_preloads_the_start_up_requests(server_run, tmp_path):
    """`GET /` names the app's first requests in a Link preload header, relative URLs that answer."""
    from vitscope.server.app import create_app

    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<!doctype html><title>app</title>")
    with TestClient(create_app(server_run, static_dir=static, warm=False)) as c:
        r = c.get("/")
        assert r.status_code == 200
        links = [part.strip() for part in r.headers["link"].split(",")]
        urls = [link.split(";")[0].strip().strip("<>") for link in links]
        assert urls[0] == "api/run" and "api/table/images" in urls and "api/table/image_heads" in urls and len(urls) <= 5
        for link, url in zip(links, urls):
            assert {"rel=preload", "as=fetch", "crossorigin"} <= {p.strip() for p in link.split(";")[1:]}, link
            assert not url.startswith("/") and c.get("/" + url).status_code == 200, url


def test_lru_keeps_at_most_its_byte_budget():
    from vitscope.server.data import LRU

    cache = LRU(10, max_bytes=10, size=len)
    for k in "abc":
        cache.get(k, lambda k=k: k * 4)  # 4 bytes each: "a" is evicted when "c" arrives
    assert cache.get("a", lambda: "new") == "new"
    assert cache.get("big", lambda: "x" * 11) == "x" * 11 and cache.get("big", lambda: "again") == "again"

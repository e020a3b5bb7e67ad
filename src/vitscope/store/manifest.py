"""Building a run manifest and its fingerprint.

The fingerprint is a SHA-256 over everything that decides a run's numbers: the model spec, the
weights' SHA-256, the image list (id, path, label, file size) and the analysis settings. A run
folder is resumed only by a command with the same fingerprint; anything else would silently mix
results of two different analyses.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Mapping, Optional

from vitscope.store.layout import FORMAT, FORMAT_VERSION, STATUS_COMPLETE, STATUS_RUNNING

#: Packages whose versions are recorded in every manifest (results can depend on them).
RECORDED_PACKAGES = (
    "vitscope",
    "torch",
    "timm",
    "transformers",
    "numpy",
    "pandas",
    "pyarrow",
    "zarr",
    "scipy",
    "scikit-learn",
    "umap-learn",
    "pillow",
)

#: The parts of a run that the fingerprint covers, in the order mismatches are reported.
FINGERPRINT_PARTS = ("model", "images", "settings")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint(parts: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """``(overall digest, {part: digest})`` of the ``FINGERPRINT_PARTS`` in ``parts``."""
    missing = [p for p in FINGERPRINT_PARTS if p not in parts]
    if missing:
        raise ValueError(f"fingerprint needs parts {missing}")
    digests = {p: _digest(parts[p]) for p in FINGERPRINT_PARTS}
    return _digest(digests), digests


def describe_mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """A readable account of how two fingerprinted run descriptions differ."""
    lines = []
    old_parts = old.get("fingerprint_parts", {})
    new_parts = new.get("fingerprint_parts", {})
    if old_parts.get("model") != new_parts.get("model"):
        om, nm = old.get("model", {}), new.get("model", {})
        def said(m: Mapping[str, Any]) -> str:
            return (f"{m.get('spec')!r} (loaded weights sha256 {str(m.get('state_sha256'))[:12]}, "
                    f"file sha256 {str(m.get('weights_sha256'))[:12]}, dtype {m.get('dtype')}, device {m.get('device_type')})")

        lines.append(f"model: was {said(om)}, now {said(nm)}")
    if old_parts.get("images") != new_parts.get("images"):
        oi, ni = old.get("images", {}), new.get("images", {})
        orecs, nrecs = oi.get("records", []), ni.get("records", [])
        first = next((i for i, (a, b) in enumerate(zip(orecs, nrecs)) if a != b), min(len(orecs), len(nrecs)))
        detail = ""
        if first < max(len(orecs), len(nrecs)):
            a = orecs[first] if first < len(orecs) else None
            b = nrecs[first] if first < len(nrecs) else None
            detail = f"; first difference at image {first}: was {a}, now {b}"
        lines.append(f"images: was {len(orecs)} images from {oi.get('source')!r}, now {len(nrecs)} from {ni.get('source')!r}{detail}")
    if old_parts.get("settings") != new_parts.get("settings"):
        os_, ns = old.get("settings", {}), new.get("settings", {})
        diffs = [f"{k}: {os_.get(k)!r} -> {ns.get(k)!r}" for k in sorted(set(os_) | set(ns)) if os_.get(k) != ns.get(k)]
        lines.append("settings: " + ", ".join(diffs))
    return "; ".join(lines) or "the run descriptions differ"


def new_run_manifest(
    *,
    model: Mapping[str, Any],
    images: Mapping[str, Any],
    settings: Mapping[str, Any],
    model_identity: Mapping[str, Any],
    chunk_size: int,
    n_chunks: int,
    command: Optional[str],
) -> dict[str, Any]:
    """The manifest of a run that starts now (status ``running``); docs/run-format.md lists its keys.

    Args:
        model: what the run records about its model (spec, layout, preprocessing, class names ...).
        images: the image list (``source``, ``records`` of ``image_id, path, label, size`` and, for
            an image inside a container file, ``member`` ...).
        settings: the analysis settings, as plain values.
        model_identity: the parts of ``model`` that decide every number (spec, weight hashes,
            dtype, device type): the fingerprint covers these, the image records and the settings.
    """
    records = images["records"]
    fp, parts = fingerprint(
        {
            "model": dict(model_identity),
            # An image inside a container adds its member; file images keep their old fingerprint.
            "images": [[r["image_id"], r["path"], r["label"], r["size"], *([r["member"]] if r.get("member") is not None else [])]
                       for r in records],
            "settings": dict(settings),
        }
    )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "status": STATUS_RUNNING,
        "created": now_iso(),
        "completed": None,
        "command": command,
        "fingerprint": fp,
        "fingerprint_parts": parts,
        "model": dict(model),
        "images": dict(images),
        "settings": dict(settings),
        "chunks": {"size": chunk_size, "count": n_chunks},
        "versions": package_versions(),
        # Every command that worked on the run (the first one and each resume), with its versions.
        "invocations": [{"started": now_iso(), "command": command, "versions": package_versions()}],
        "failures": [],
        "counts": {"listed": len(records), "analysed": None, "failed": None},
    }


def resumed_manifest(old: Mapping[str, Any], new: Mapping[str, Any], command: Optional[str]) -> dict[str, Any]:
    """The manifest of an unfinished run taken up again by ``new``'s command: the old one, with the
    resume counted and the new invocation appended."""
    invocations = list(old.get("invocations", [])) + list(new["invocations"])
    return {**old, "resumed": int(old.get("resumed", 0)) + 1, "command": command or old.get("command"), "invocations": invocations}


def completed_manifest(manifest: Mapping[str, Any], *, failures: list, listed: int, analysed: int, **extra: Any) -> dict[str, Any]:
    """``manifest`` marked complete now, with the final counts, failures and any ``extra`` keys."""
    out = dict(manifest)
    out["failures"] = failures
    out["counts"] = {"listed": listed, "analysed": analysed, "failed": len(failures)}
    out.update(extra)
    out["status"] = STATUS_COMPLETE
    out["completed"] = now_iso()
    return out

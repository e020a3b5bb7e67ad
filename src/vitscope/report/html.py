"""The report's ``index.html``: the run's summary and every figure with its caption (works offline)."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Sequence

from vitscope.report.registry import ReportFigure

if TYPE_CHECKING:  # pragma: no cover
    from vitscope.store import Run


def report_html(run: "Run", entries: Sequence[ReportFigure], svg: bool = False) -> str:
    m = run.manifest
    model = m["model"]
    counts = m.get("counts", {})
    esc = html.escape
    top = run.heads.sort_values("prob_drop", ascending=False).head(5) if "prob_drop" in run.heads else run.heads.head(0)
    top_rows = "".join(
        f"<tr><td>{int(r.layer)}</td><td>{int(r.head)}</td><td>{r.prob_drop:.4f}</td>"
        f"<td>[{r.prob_drop_lo:.4f}, {r.prob_drop_hi:.4f}]</td></tr>"
        for r in top.itertuples()
    )
    fails = m.get("failures", [])
    fail_html = (
        "<details><summary>{} image(s) skipped</summary><ul>{}</ul></details>".format(
            len(fails), "".join(f"<li><code>{esc(str(f['path']))}</code>: {esc(str(f['reason']))}</li>" for f in fails)
        )
        if fails
        else "<p>No image was skipped.</p>"
    )
    def svg_link(e: ReportFigure) -> str:
        return f' <a href="{e.stem}.svg">SVG</a>' if svg else ""

    figs = "\n".join(
        f'<figure id="{e.stem}"><h2>{esc(e.title)}</h2><img src="{e.stem}.png" alt="{esc(e.title)}">'
        f'<figcaption>{esc(e.caption)}{svg_link(e)}</figcaption></figure>'
        for e in entries
    )
    toc = " · ".join(f'<a href="#{e.stem}">{esc(e.title)}</a>' for e in entries)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>vitscope report: {esc(str(model.get('name')))}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em; color: #222; }}
figure {{ margin: 2.5em 0; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ color: #555; font-size: 0.92em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }} nav {{ font-size: 0.9em; }}
</style></head><body>
<h1>vitscope report</h1>
<p>Model <b>{esc(str(model.get('spec')))}</b> ({model.get('num_layers')} layers x {model.get('num_heads')} heads,
weights sha256 <code>{esc(str(model.get('weights_sha256'))[:16])}</code>);
{counts.get('analysed')} images analysed from <code>{esc(str(m['images'].get('source')))}</code>.
Run folder <code>{esc(str(run.path))}</code>, finished {esc(str(m.get('completed')))}.
{esc(objective_sentence(m.get('settings', {})))}</p>
{fail_html}
<h3>Most important heads (probability drop)</h3>
<table><tr><th>layer</th><th>head</th><th>mean drop</th><th>95% interval</th></tr>{top_rows}</table>
<nav><p>{toc}</p></nav>
{figs}
</body></html>
"""


#: How each objective measures a pruned head, said once at the top of the report.
OBJECTIVE_SENTENCES = {
    "label": "Heads are measured through the model's own classifier (probability, loss and accuracy of each image's label).",
    "embedding": "Heads are measured by how far pruning moves the pooled image embedding (1 - cos; --objective embedding).",
    "zero-shot": "Heads are measured through the model's zero-shot classifier: its text tower's embedding of the prompt {prompt!r} "
                 "for each class name (--objective zero-shot).",
    "probe": "Heads are measured through a linear probe on the unpruned embeddings, cross-fitted over {folds} folds: each image "
             "is scored by the probe fitted on the other folds (--objective probe).",
}


def objective_sentence(settings: dict) -> str:
    """What the run's probabilities and accuracies are of (its ``objective`` setting)."""
    objective = settings.get("objective", "label")
    text = OBJECTIVE_SENTENCES.get(objective, f"Heads are measured by objective {objective!r}.")
    return text.format(prompt=settings.get("zero_shot_prompt", "a photo of a {}."), folds=settings.get("probe_folds", 5))

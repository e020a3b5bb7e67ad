"""Figures for papers: one module per family, each function returning a matplotlib ``Figure`` from
data (a run, masks, summaries), and one deterministic save helper (:func:`save_figure`).

- :mod:`vitscope.figures.save`: PNG + SVG without timestamps or random ids (re-drawing gives
  identical files);
- :mod:`vitscope.figures.winft`: what each layer's WinfT mask lets a patch see, and the key budget;
- :mod:`vitscope.figures.run`: the first paper's figures of a run (importance, strength, patterns);
- :mod:`vitscope.figures.interaction`: the second paper's (responsive fields, flow colours, the
  window-design, removal and agreement curves).

Which figures a report draws is decided by :mod:`vitscope.report.registry`.
"""

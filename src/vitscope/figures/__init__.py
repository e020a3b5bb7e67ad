"""Figures for papers: one module per family, each function returning a matplotlib ``Figure`` from
data (a run, masks, summaries), and one deterministic save helper (:func:`save_figure`).

- :mod:`vitscope.figures.save`: PNG + SVG without timestamps or random ids (re-drawing gives
  identical files);
- :mod:`vitscope.figures.winft`: what each layer's WinfT mask lets a patch see, and the key budget;
- :mod:`vitscope.figures_interaction` (patch interactions) and :mod:`vitscope.report` (paper 1's
  figures of a run) draw the rest.
"""

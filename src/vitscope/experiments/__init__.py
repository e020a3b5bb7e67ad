"""Reproducible experiments built on vitscope's models, analyses and training loop.

Each module is runnable (``python -m vitscope.experiments.<name> --help``), resumable, and writes
``results.json`` plus a markdown table of what it measured.
"""

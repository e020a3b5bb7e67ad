"""Defaults live once: every command-line option that sets a settings field defaults to that field's
default in the settings class (AnalyzeSettings for analyze, Recipe for train)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest


def _option_defaults(command) -> dict[str, object]:
    return {name: p.default.default for name, p in inspect.signature(command).parameters.items() if hasattr(p.default, "default")}


@pytest.mark.parametrize(
    "command_module, settings_path, renames",
    [
        ("vitscope.cli.analyze", "vitscope.analysis.settings:AnalyzeSettings", {}),
        ("vitscope.cli.train", "vitscope.training:Recipe", {"holdout": "holdout_fraction"}),
    ],
)
def test_cli_defaults_are_the_settings_defaults(command_module, settings_path, renames):
    import importlib

    module = importlib.import_module(command_module)
    command = getattr(module, command_module.rsplit(".", 1)[1])
    mod, cls = settings_path.split(":")
    settings = getattr(importlib.import_module(mod), cls)
    defaults = {f.name: f.default for f in dataclasses.fields(settings)}
    options = _option_defaults(command)
    shared = {renames.get(k, k): v for k, v in options.items() if renames.get(k, k) in defaults}
    assert len(shared) >= 8, f"too few options matched {cls}'s fields: {sorted(shared)}"
    wrong = {k: (v, defaults[k]) for k, v in shared.items() if v != defaults[k]}
    assert not wrong, f"command-line defaults differ from {cls}'s: {wrong}"

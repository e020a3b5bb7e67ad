"""Simulated interruptions for the resume tests: a function that raises ``KeyboardInterrupt`` (as
Ctrl-C would) at its n-th call, with every other call passed through."""

from __future__ import annotations

from typing import Any


def interrupt_at_call(monkeypatch: Any, module: Any, name: str, when: int) -> None:
    """Replace ``module.name`` (for this test) by a wrapper that raises ``KeyboardInterrupt`` on
    call number ``when`` (1-based) and otherwise calls the original."""
    original = getattr(module, name)
    calls = {"n": 0}

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == when:
            raise KeyboardInterrupt(f"simulated interruption at call {when} of {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)

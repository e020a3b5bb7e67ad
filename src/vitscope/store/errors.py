"""Errors raised when reading or writing a run folder."""

from __future__ import annotations


class RunError(ValueError):
    """Base class: something is wrong with a run folder."""


class NotARunError(RunError):
    """The folder does not hold a vitscope run (no ``manifest.json`` of the right format)."""


class UnfinishedRunError(RunError):
    """The run was started but has not finished; rerun the same ``vitscope analyze`` command to resume it."""


class RunMismatchError(RunError):
    """An existing run folder was made by a different command (model, weights, images or settings)."""


class RunLockedError(RunError):
    """Another process holds the run folder's lock (another ``analyze`` writing the same run)."""


class DamagedChunkWarning(UserWarning):
    """A finished chunk of an unfinished run failed its size/checksum check and is analysed again."""

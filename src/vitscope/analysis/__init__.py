"""Analyses built on the core capture API: head importance, attention strength, patterns, patch interactions."""

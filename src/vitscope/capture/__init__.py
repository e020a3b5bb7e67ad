"""Exact attention capture and pruning with fused attention left on (see runtime.py)."""

from vitscope.capture.masks import REGIONS, compile_masks, region_matrix, regions_for
from vitscope.capture.runtime import AttentionRuntime, LayerPlan

__all__ = ["REGIONS", "AttentionRuntime", "LayerPlan", "compile_masks", "region_matrix", "regions_for"]

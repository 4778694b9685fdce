"""SparseKD: importance, structured and masked pruning, and staged prune → distill schedules."""

from chorus.compress.importance import Importance, calibration_batches, measure
from chorus.compress.masks import Masks, nm_keep, to_semi_structured
from chorus.compress.masks import compute as compute_masks
from chorus.compress.stages import run
from chorus.compress.structured import Plan, apply_plan, make_plan, param_count, prune, sizes_for

__all__ = ["Importance", "Masks", "Plan", "apply_plan", "calibration_batches", "compute_masks", "make_plan", "measure",
           "nm_keep", "param_count", "prune", "run", "sizes_for", "to_semi_structured"]

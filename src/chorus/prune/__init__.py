"""SparseKD's pruning: importance, structured plans and masks (the staged schedule is `chorus.commands.compress`)."""

from chorus.prune.importance import Importance, measure
from chorus.prune.masks import Masks, nm_keep, to_semi_structured
from chorus.prune.masks import compute as compute_masks
from chorus.prune.structured import Plan, apply_plan, make_plan, param_count, prune, sizes_for

__all__ = ["Importance", "Masks", "Plan", "apply_plan", "compute_masks", "make_plan", "measure",
           "nm_keep", "param_count", "prune", "sizes_for", "to_semi_structured"]

"""SparseKD's pruning: importance, structured plans, masks and gradual schedules (the staged recipe is
`chorus.commands.compress`)."""

from chorus.prune.importance import Importance, measure
from chorus.prune.masks import Masks, nm_keep, to_semi_structured
from chorus.prune.masks import compute as compute_masks
from chorus.prune.schedule import GradualPruner, Schedule, plan_of, remove_masked
from chorus.prune.structured import Plan, apply_plan, make_plan, param_count, plan_masks, prune, sizes_for

__all__ = ["GradualPruner", "Importance", "Masks", "Plan", "Schedule", "apply_plan", "compute_masks", "make_plan",
           "measure", "nm_keep", "param_count", "plan_masks", "plan_of", "prune", "remove_masked", "sizes_for",
           "to_semi_structured"]

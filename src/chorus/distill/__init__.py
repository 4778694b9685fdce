"""The math of distillation from sparse targets: the sparse distribution and its exact tail, softening, pooling
several teachers, the losses, calibration and blending. Pure torch: no store, no model."""

from chorus.distill.blend import compare, fit_domain_weights, pooled_nll
from chorus.distill.calibration import expected_calibration_error, fit_temperature
from chorus.distill.ensemble import aggregate, geometric, mixture, power
from chorus.distill.losses import LOSSES, chunked_distill_loss, distill_loss_from_logits, get_loss
from chorus.distill.sparse import SparseDist, from_samples, from_topk, from_topk_renormalized, soften, to_dense
from chorus.distill.targets import TargetBuilder, Targets, check_combination, pool, teacher_dist

__all__ = ["LOSSES", "SparseDist", "TargetBuilder", "Targets", "aggregate", "check_combination", "chunked_distill_loss",
           "compare", "distill_loss_from_logits", "expected_calibration_error", "fit_domain_weights", "fit_temperature",
           "from_samples", "from_topk", "from_topk_renormalized", "geometric", "get_loss", "mixture", "pool",
           "pooled_nll", "power", "soften", "teacher_dist", "to_dense"]

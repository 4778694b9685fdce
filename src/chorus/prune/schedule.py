"""Gradual pruning: a sparsity that grows during one run, and masks that follow it.

A :class:`Schedule` says how much is pruned once ``step`` optimizer steps are done (s_i = ``start``,
s_f = ``target``, t0 = ``begin``, t1 = ``end``; s_i before t0, s_f from t1 on):

- ``one-shot``: s_f from t0 on.
- ``stages``: n equal steps along the linear path. t1 − t0 steps are split over the n stages as
  `chorus compress` splits its budget (evenly, the first stages taking the remainder); stage k (1-based) holds
  s_i + (s_f − s_i)·k/n from its first step, so ``stages=1`` is one-shot and n stages in one run walk the
  path that `chorus compress` walks in n runs.
- ``linear``: s_i + (s_f − s_i)·f, and ``cubic``: s_f + (s_i − s_f)·(1 − f)³ (Zhu & Gupta 2017, "To prune, or
  not to prune", eq. 1), with f = (τ − t0)/(t1 − t0) where τ = t0 + kΔt is the last update at or before the
  step (Δt = ``every``); the last update lands at t1 even when Δt does not divide t1 − t0.

A :class:`GradualPruner` keeps ``Masks`` on a model at the schedule's sparsity: call ``update(step)`` before
each step's forward (``step`` = optimizer steps done so far) and ``apply()`` after each optimizer step. At
every change it recomputes the masks from the current weights; masks only grow (a pruned weight, head,
channel or layer stays pruned). Patterns:

- ``unstructured`` and ``2:4``: ``masks.compute`` at the schedule's sparsity s with the current masks as
  ``previous`` (they score lowest, so they stay pruned). Counts are exact: each matrix (magnitude) or each row
  (wanda, and 2:4) prunes round(s·n) of its n weights (Python's round, as ``masks.compute``). The 2:4 path is
  the one `chorus compress` stages walk: at s ≤ 0.5 a row drops its round(s·n) lowest-scored weights among
  those exact 2:4 would drop (two per group of four), so no group ever loses more than two and at s = 0.5
  every group has lost exactly two.
- ``structured``: s is the share of the model's parameters removed (as ``structured.param_count`` counts
  them); ``structured.sizes_for`` turns it into the KV groups, MLP channels and layers to keep (never more
  than kept before), and ``structured.make_plan`` picks them by activation importance (importance.measure on
  the calibration rows; units already masked rank last). Whole KV groups are masked, never single query
  heads: a GQA model keeps the same number of query heads per KV head, so a lone query head cannot be
  removed. The masked model computes what ``remove_masked`` returns.

Resuming: ``state_dict()`` holds the masks and the sparsity they were made for; a run restored from it (with
the model and optimizer) continues bit-identically, since every later update is a function of the weights,
the calibration rows and these masks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from chorus.errors import ChorusError
from chorus.prune import importance, structured
from chorus.prune import masks as masks_mod
from chorus.prune.masks import Masks

KINDS = ("one-shot", "stages", "linear", "cubic")
PATTERNS = ("unstructured", "2:4", "structured")
MASKABLE_AXES = ("heads", "mlp", "layers")  # hidden channels: RMSNorm makes masking differ from removal
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Schedule:
    """The sparsity after each optimizer step (module docstring): ``kind`` one of KINDS; ``target`` the final
    sparsity; ``start`` the sparsity before ``begin``; ``end`` the step that reaches ``target``; ``every`` Δt
    (linear, cubic); ``stages`` n (stages)."""

    kind: str
    target: float
    start: float = 0.0
    begin: int = 0
    end: int = 0
    every: int = 1
    stages: int = 1

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> ChorusError:
            return ChorusError(f"schedule '{key}': expected {expected}, got {getattr(self, key)!r}")

        if self.kind not in KINDS:
            raise bad("kind", f"one of {', '.join(KINDS)}")
        for key in ("begin", "end", "every", "stages"):
            if not isinstance(getattr(self, key), int) or isinstance(getattr(self, key), bool):
                raise bad(key, "an integer number of steps" if key != "stages" else "an integer")
        if not 0.0 <= self.target < 1.0:
            raise bad("target", "a sparsity in [0, 1)")
        if not 0.0 <= self.start <= self.target:
            raise bad("start", f"a sparsity in [0, target={self.target}]")
        if self.begin < 0:
            raise bad("begin", "a step ≥ 0")
        if self.every < 1:
            raise bad("every", "a positive number of steps")
        if self.stages < 1:
            raise bad("stages", "a positive integer")
        if self.kind != "one-shot" and self.end <= self.begin:
            raise bad("end", f"a step after begin={self.begin} (a {self.kind} schedule needs room to grow; "
                             "use kind one-shot to prune at one step)")
        if self.kind == "stages" and self.end - self.begin < self.stages:
            raise bad("end", f"at least begin + stages = {self.begin + self.stages} (one step per stage)")

    def sparsity_at(self, step: int) -> float:
        """The sparsity the masks hold once ``step`` optimizer steps are done."""
        if step < self.begin:
            return self.start
        if self.kind == "one-shot" or step >= self.end:
            return self.target
        span = self.end - self.begin
        if self.kind == "stages":
            n, done = self.stages, step - self.begin
            size, extra = divmod(span, n)  # stage k (0-based) is size + (k < extra) steps long
            k = done // (size + 1) if done < extra * (size + 1) else extra + (done - extra * (size + 1)) // size
            return self._along((k + 1) / n)
        f = (step - self.begin) // self.every * self.every / span
        if self.kind == "linear":
            return self._along(f)
        return self.start if f == 0 else self.target + (self.start - self.target) * (1.0 - f) ** 3

    def _along(self, f: float) -> float:
        """The linear path at fraction ``f`` (exactly ``target`` at f = 1)."""
        return self.target if f >= 1 else self.start + (self.target - self.start) * f

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ChorusError(f"schedule: unknown keys {', '.join(unknown)}; expected some of "
                              f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**d)


class GradualPruner:
    """Masks on ``model`` that follow ``schedule`` (module docstring). ``score`` (magnitude or wanda) ranks
    weights for ``unstructured`` and ``2:4``; ``axes`` (some of heads, mlp, layers) are what ``structured``
    prunes. ``calibration`` (batches of input_ids and attention_mask) is needed by wanda and structured;
    activations are measured again at every update, on the current weights."""

    def __init__(self, model: nn.Module, schedule: Schedule, *, pattern: str = "unstructured",
                 score: str = "magnitude", axes: tuple[str, ...] = ("heads", "mlp"),
                 calibration: list[dict] | None = None) -> None:
        if pattern not in PATTERNS:
            raise ChorusError(f"unknown pruning pattern '{pattern}'; expected one of: {', '.join(PATTERNS)}")
        if score not in ("magnitude", "wanda"):
            raise ChorusError(f"unknown pruning score '{score}'; expected magnitude or wanda")
        if pattern == "2:4" and schedule.target > 0.5:
            raise ChorusError(f"schedule 'target': 2:4 prunes at most 0.5 (two of every four), got {schedule.target}")
        if (pattern == "structured" or score == "wanda") and not calibration:
            raise ChorusError(f"{'structured pruning' if pattern == 'structured' else 'Wanda scores'} need "
                              "calibration rows (pass calibration=batches)")
        axes = tuple(axes)
        if pattern == "structured":
            if not axes or any(a not in MASKABLE_AXES for a in axes):
                raise ChorusError(f"gradual structured pruning masks some of {', '.join(MASKABLE_AXES)}, got "
                                  f"{list(axes)} (hidden channels can only be pruned physically: structured.prune)")
            structured.sizes_for(model.config, 1.0 - schedule.target, axes)  # unreachable: fail now, not mid-run
        self.model, self.schedule, self.pattern, self.score = model, schedule, pattern, score
        self.axes, self.calibration = axes, calibration
        self.masks: Masks | None = None
        self.sparsity = 0.0  # the schedule's value that the masks were made for
        self.sizes: dict | None = None  # structured: the sizes kept

    # ------------------------------------------------------------------ the loop
    def update(self, step: int) -> bool:
        """Recompute the masks if the schedule's sparsity after ``step`` optimizer steps differs from the one
        they hold; bind them (masked weights become zero, their gradients zero). Returns whether they changed."""
        s = self.schedule.sparsity_at(step)
        if s == self.sparsity:
            return False
        new = self._unit_masks(s) if self.pattern == "structured" else self._weight_masks(s)
        self.sparsity = s
        if new is None:
            return False
        self._bind(new)
        return True

    def apply(self) -> None:
        """Zero every masked weight (after each optimizer step)."""
        if self.masks:
            self.masks.apply()

    @torch.no_grad()
    def _weight_masks(self, s: float) -> Masks:
        inputs = importance.measure(self.model, self.calibration).inputs if self.score == "wanda" else None
        return masks_mod.compute(self.model, s, score=self.score, pattern=self.pattern, inputs=inputs,
                                 previous=self.masks)

    @torch.no_grad()
    def _unit_masks(self, s: float) -> Masks | None:
        config = self.model.config
        full = structured.shape(config)
        sizes = structured.sizes_for(config, 1.0 - s, self.axes) if s > 0 else {
            "layers": full["layers"], "kv": full["kv"], "intermediate": full["intermediate"], "hidden": full["hidden"]}
        if self.sizes is not None:
            sizes = {k: min(v, self.sizes[k]) for k, v in sizes.items()}
        if sizes == self.sizes:
            return None
        imp = importance.measure(self.model, self.calibration)
        if self.masks:
            imp = _ranked_last(imp, plan_of(self.model, self.masks), full["group"])
        self.sizes = sizes
        return Masks(structured.plan_masks(self.model, structured.make_plan(self.model, imp, **sizes)))

    def _bind(self, new: Masks) -> None:
        if self.masks:
            self.masks.unbind()
        self.masks = new.bind(self.model)

    # ------------------------------------------------------------------ resuming
    def _setup(self) -> dict:
        return {"schedule": self.schedule.to_dict(), "pattern": self.pattern, "score": self.score,
                "axes": list(self.axes)}

    def state_dict(self) -> dict:
        """What a resumed run needs: the masks (CPU bool tensors) and the sparsity and sizes they were made for."""
        return {"format_version": FORMAT_VERSION, **self._setup(), "sparsity": self.sparsity, "sizes": self.sizes,
                "masks": {k: v.detach().cpu().clone() for k, v in self.masks.masks.items()} if self.masks else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` (after the model's weights) and bind its masks to the model."""
        if state.get("format_version") != FORMAT_VERSION:
            raise ChorusError(f"pruning state: expected format_version {FORMAT_VERSION}, got "
                              f"{state.get('format_version')!r}")
        mine = self._setup()
        changed = sorted(k for k in mine if state.get(k) != mine[k])
        if changed:
            raise ChorusError(f"the saved pruning state was made with another setup (differs in: "
                              f"{', '.join(changed)}); resume with the same schedule, pattern, score and axes")
        if self.masks:
            self.masks.unbind()
        self.masks = Masks(state["masks"]).bind(self.model) if state["masks"] else None
        self.sparsity, self.sizes = state["sparsity"], state["sizes"]


# ---------------------------------------------------------------------------------------------- structured
def plan_of(model: nn.Module, masks: Masks) -> structured.Plan:
    """The Plan that whole-unit ``masks`` stand for: a layer is kept if anything in it is, a KV group if any
    ``o_proj`` column of its query heads is, an MLP channel if its ``down_proj`` column is."""
    s = structured.shape(model.config)
    layers, kv_groups, channels = [], [], []
    for i in range(s["layers"]):
        mine = {k: m for k, m in masks.masks.items() if k.startswith(f"model.layers.{i}.")}
        if not any(bool(m.any()) for m in mine.values()):
            continue
        o, down = (mine.get(f"model.layers.{i}.{m}.weight") for m in ("self_attn.o_proj", "mlp.down_proj"))
        if o is None or down is None:
            raise ChorusError(f"masks of layer {i} lack o_proj or down_proj; they are not structured masks of "
                              "this model")
        layers.append(i)
        kv_groups.append(torch.nonzero(o.cpu().any(0).reshape(s["kv"], -1).any(-1)).flatten().tolist())
        channels.append(torch.nonzero(down.cpu().any(0)).flatten().tolist())
    return structured.Plan(layers=layers, kv_groups=kv_groups, channels=channels, hidden=list(range(s["hidden"])))


def remove_masked(model: nn.Module, masks: Masks) -> nn.Module:
    """A smaller model of the same class without the masked KV groups, MLP channels and layers (``model`` is
    untouched; ``structured.apply_plan``): it computes what the masked ``model`` computes, and saves and loads
    with ``save_pretrained``/``from_pretrained``. ``masks`` must mask whole units, the same number in every
    kept layer (what a structured GradualPruner makes)."""
    plan = plan_of(model, masks)
    if not plan.layers:
        raise ChorusError("every layer is masked; nothing would be left to remove into")
    want = structured.plan_masks(model, plan)
    odd = sorted(k for k in set(want) | set(masks.masks)
                 if k not in want or k not in masks.masks or not torch.equal(want[k], masks.masks[k].cpu()))
    if odd:
        raise ChorusError(f"masks of '{odd[0]}' are not whole heads, MLP channels or layers; only structured "
                          "masks can be removed (unstructured and 2:4 masks stay masks)")
    if len({len(g) for g in plan.kv_groups}) > 1 or len({len(c) for c in plan.channels}) > 1:
        raise ChorusError("kept layers differ in KV groups or MLP channels; an HF Llama config has one width, so "
                          "every kept layer must keep as many")
    return structured.apply_plan(model, plan)


def _ranked_last(imp: importance.Importance, plan: structured.Plan, group: int) -> importance.Importance:
    """``imp`` with every unit that ``plan`` drops at −inf, so that a new plan keeps none of them."""
    heads, mlp, layers = imp.heads.clone(), imp.mlp.clone(), imp.layers.clone()
    dropped = [i for i in range(len(layers)) if i not in plan.layers]
    layers[dropped] = -math.inf
    for j, i in enumerate(plan.layers):
        for g in range(heads.shape[1] // group):
            if g not in plan.kv_groups[j]:
                heads[i, g * group:(g + 1) * group] = -math.inf
        gone = torch.ones(mlp.shape[1], dtype=torch.bool)
        gone[plan.channels[j]] = False
        mlp[i, gone] = -math.inf
    return dataclasses.replace(imp, heads=heads, mlp=mlp, layers=layers)

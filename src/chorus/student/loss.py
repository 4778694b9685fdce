"""The loss `chorus train` minimizes, for any training loop: :class:`DistillLoss`.

A batch of :class:`~chorus.student.dataset.CacheDataset` (input ids, segment ids, domain, each teacher's cached
arrays) → the next-token positions that predict a real token → the pooled sparse target of the teachers (the one
target builder, distill/targets.py) → (1 − w)·CE + w·T²·D(target, student). The student's log-probs are computed a
chunk of positions at a time from its final hidden states and LM head (no (N, V) tensor is kept for backward), or
from logits a caller already has. Settings are `chorus train`'s keys, checked by the same rules, and a stored
blend (`chorus blend`) fills in the defaults the same way, so both give the same loss on the same batch.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chorus.config import TrainConfig
from chorus.distill.losses import chunked_distill_loss, distill_loss_from_logits, get_loss
from chorus.distill.targets import TargetBuilder, Targets, check_combination
from chorus.errors import ChorusError
from chorus.progress import say
from chorus.store import Store, blend_fill, check_teachers, stored_blend
from chorus.student.data import Positions, positions

# `chorus train` keys that decide the loss (the rest decide the run: steps, optimizer, data, checkpoints).
LOSS_KEYS = ("loss", "target", "kd_weight", "temperature", "softening", "aggregate", "weighting", "teacher_weights",
             "domain_weights", "alpha", "beta", "calibrated", "teacher_temperatures", "blend", "chunk_size")


# ---------------------------------------------------------------------------------------------- settings
def validate(cfg: TrainConfig, domains: tuple[str, ...]) -> None:
    """Every setting a run needs, checked before anything is written (a refused run blocks no rerun)."""
    check_combination(target=cfg.target, loss=cfg.loss, operator=cfg.aggregate, weighting=cfg.weighting,
                      temperature=cfg.temperature)
    for key in ("steps", "batch_size", "grad_accum", "log_every", "shuffle_buffer"):
        if getattr(cfg, key) < 1:
            raise ChorusError(f"train key '{key}': expected a positive integer, got {getattr(cfg, key)}")
    for key in ("eval_every", "eval_rows", "save_every", "warmup_steps", "num_workers"):
        if getattr(cfg, key) < 0:
            raise ChorusError(f"train key '{key}': expected an integer >= 0, got {getattr(cfg, key)}")
    for key in ("train_rows", "exclude_rows", "chunk_size"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise ChorusError(f"train key '{key}': expected a positive integer, got {getattr(cfg, key)}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ChorusError(f"train key 'lr': expected a positive finite number, got {cfg.lr}")
    for key in ("weight_decay", "clip", "beta"):
        if not (math.isfinite(getattr(cfg, key)) and getattr(cfg, key) >= 0):
            raise ChorusError(f"train key '{key}': expected a finite number >= 0, got {getattr(cfg, key)}")
    if not math.isfinite(cfg.alpha):
        raise ChorusError(f"train key 'alpha': expected a finite number, got {cfg.alpha}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ChorusError(f"train key 'min_lr_ratio': expected a number in [0, 1], got {cfg.min_lr_ratio}")
    if not 0.0 <= cfg.kd_weight <= 1.0:
        raise ChorusError(f"train key 'kd_weight': expected a number in [0, 1], got {cfg.kd_weight}")
    if len(set(cfg.teachers)) != len(cfg.teachers):
        raise ChorusError(f"train key 'teachers': a teacher is listed twice in {cfg.teachers}")
    for name in cfg.teacher_weights:
        if name not in cfg.teachers:
            raise ChorusError(f"teacher_weights names '{name}', which is not in --teachers ({', '.join(cfg.teachers)})")
    for dom, ws in cfg.domain_weights.items():
        if dom not in domains:
            raise ChorusError(f"domain_weights names domain '{dom}'; the store has: {', '.join(domains)}")
        if not isinstance(ws, dict) or any(t not in cfg.teachers for t in ws):
            raise ChorusError(f"domain_weights['{dom}']: expected {{teacher: weight}} over --teachers, got {ws!r}")


def with_blend(cfg: TrainConfig, store: Store, *, announce: bool = True) -> TrainConfig:
    """The config with the store's fitted blend for these teachers (`chorus blend`) filled in where the
    user left the defaults: per-domain weights unless domain_weights is set, the per-token weighting unless
    one is chosen, the blend's temperatures unless some are set. The run's config.yaml records the result."""
    if not cfg.blend or len(cfg.teachers) < 2:
        return cfg
    fitted = stored_blend(store, cfg.teachers)
    if fitted is None:
        return cfg
    changes = blend_fill(fitted, domain_weights=cfg.domain_weights, weighting=cfg.weighting, operator=cfg.aggregate)
    if cfg.calibrated and not cfg.teacher_temperatures and fitted.get("temperatures"):
        changes["teacher_temperatures"] = fitted["temperatures"]
    if changes and announce:
        say(f"using the store's fitted blend '{fitted['choice']}' for {', '.join(cfg.teachers)} "
            f"({', '.join(sorted(changes))}; blend: false to ignore it)")
    return dataclasses.replace(cfg, **changes)


def prior_table(cfg: TrainConfig, domains: tuple[str, ...]) -> Tensor:
    """(D, T) teacher weight per domain: global teacher_weights × per-domain domain_weights (default 1)."""
    table = torch.tensor([[float(cfg.teacher_weights.get(t, 1.0)) * float(cfg.domain_weights.get(d, {}).get(t, 1.0))
                           for t in cfg.teachers] for d in domains], dtype=torch.float32)
    if cfg.teachers and (not torch.isfinite(table).all() or (table < 0).any() or (table.sum(1) <= 0).any()):
        bad = [d for d, row in zip(domains, table) if row.sum() <= 0 or (row < 0).any()]
        raise ChorusError(f"teacher weights must be >= 0 with a positive sum in every domain; check domain(s) {bad}")
    return table


# ---------------------------------------------------------------------------------------------- the loss
class DistillLoss:
    """`chorus train`'s loss over a store's cached teachers, for any loop.

    ``DistillLoss(store, teachers, **settings)``: ``settings`` are `chorus train` keys (:data:`LOSS_KEYS`; defaults
    and refusals as in `chorus train`). Call it as ``loss, parts = loss_fn(model, batch)`` with a Hugging Face causal
    LM and a collated :class:`~chorus.student.dataset.CacheDataset` batch; ``parts`` holds the CE and KD terms.
    :meth:`from_hidden` and :meth:`from_logits` take a forward pass the caller ran. No teachers: plain CE.
    ``fused=False`` always goes through the model's full logits (a reference; it holds (N, V) fp32 log-probs).
    """

    def __init__(self, store: str, teachers: list[str] | tuple[str, ...] = (), *, storage_options: dict | None = None,
                 announce: bool = False, fused: bool = True, **settings: Any) -> None:
        unknown = sorted(set(settings) - set(LOSS_KEYS))
        if unknown:
            raise ChorusError(f"unknown loss setting '{unknown[0]}'; expected some of: {', '.join(LOSS_KEYS)}")
        cfg = TrainConfig(store=store, student="-", out="-", teachers=list(teachers),
                          storage_options=dict(storage_options or {}), **settings)
        self._setup(cfg, Store.open(store, "r", cfg.storage_options), announce=announce)
        self.fused = fused

    @classmethod
    def from_config(cls, cfg: TrainConfig, store: Store, *, announce: bool = False) -> DistillLoss:
        """The loss of a `chorus train` config (already validated or not: it is validated here)."""
        self = cls.__new__(cls)
        self._setup(cfg, store, announce=announce)
        return self

    def _setup(self, cfg: TrainConfig, store: Store, *, announce: bool) -> None:
        m = store.manifest
        cfg = with_blend(cfg, store, announce=announce)
        validate(cfg, m.domains)
        self.cfg, self.vocab_size, self.domains = cfg, m.tokenizer.vocab_size, m.domains
        manifests = check_teachers(store, cfg.teachers, need_samples=cfg.target == "samples")
        self.builder = TargetBuilder(manifests, self.vocab_size, target=cfg.target, loss=cfg.loss,
                                     operator=cfg.aggregate, weighting=cfg.weighting, temperature=cfg.temperature,
                                     calibrated=cfg.calibrated, alpha=cfg.alpha, beta=cfg.beta, warn=announce,
                                     softening=cfg.softening, teacher_temperatures=cfg.teacher_temperatures) \
            if cfg.teachers else None
        self.prior = prior_table(cfg, m.domains)
        self.divergence = get_loss(cfg.loss)
        self._split: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._prior_on: dict[str, Tensor] = {}
        self.fused = True

    @property
    def teachers(self) -> list[str]:
        return list(self.cfg.teachers)

    @property
    def kwargs(self) -> dict:
        """The loss functions' keywords (distill/losses.py) these settings give."""
        return {"loss_fn": self.divergence, "kd_weight": self.cfg.kd_weight, "temperature": self.cfg.temperature}

    def positions(self, batch: dict, device: torch.device | str = "cpu") -> Positions:
        """The batch's next-token positions that predict a real token (see :class:`Positions`)."""
        return positions(batch, device)

    def targets(self, batch: dict, pos: Positions, device: torch.device | str = "cpu") -> Targets | None:
        """The pooled sparse target at ``pos`` (None without teachers)."""
        if self.builder is None:
            return None
        key = str(device)
        if key not in self._prior_on:
            self._prior_on[key] = self.prior.to(device)
        prior = self._prior_on[key][pos.domain.to(device)]
        return self.builder.build(batch, pos.select.to(device), pos.gold.to(device), prior, device)

    # ------------------------------------------------------------------ entry points
    def __call__(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """Run ``model`` on ``batch`` and return (loss, parts): the fused chunked path through the final hidden
        states and the LM head when the model's logits are exactly that, else from its logits."""
        device = next(model.parameters()).device
        ids = batch["input_ids"].to(device)
        mask = (batch["segment_ids"].to(device) > 0).long()
        if self.fused and self._splits(model):
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                        logits_to_keep=torch.zeros(0, dtype=torch.long, device=device))
            head = _unwrap(model).get_output_embeddings()
            return self.from_hidden(out.hidden_states[-1], head.weight, batch, lm_head_bias=head.bias)
        return self.from_logits(model(input_ids=ids, attention_mask=mask).logits, batch)

    def from_hidden(self, hidden: Tensor, lm_head_weight: Tensor, batch: dict, *,
                    lm_head_bias: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, parts) from the final hidden states (B, L, H) and the LM head (V', H), V' ≥ the store's
        vocabulary (rows past it are padding and are cut), log-probs computed a chunk of positions at a time."""
        device = hidden.device
        pos = self.positions(batch, device)
        targets = self.targets(batch, pos, device)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[pos.select]
        w = lm_head_weight[: self.vocab_size]
        b = lm_head_bias[: self.vocab_size] if lm_head_bias is not None else None
        return chunked_distill_loss(h, w, pos.gold, targets.pooled if targets else None, chunk_size=self.cfg.chunk_size,
                                    lm_head_bias=b, **self.kwargs)

    def from_logits(self, logits: Tensor, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, parts) from logits (B, L, V'), V' ≥ the store's vocabulary (an unchunked reference: it holds
        the (N, V) log-probs)."""
        device = logits.device
        pos = self.positions(batch, device)
        targets = self.targets(batch, pos, device)
        flat = logits[:, :-1, : self.vocab_size].reshape(-1, self.vocab_size)[pos.select]
        return distill_loss_from_logits(flat, pos.gold, targets.pooled if targets else None, **self.kwargs)

    # ------------------------------------------------------------------ structure
    def _splits(self, model: nn.Module) -> bool:
        """Does ``model`` give its final hidden states and skip its logits (``logits_to_keep``), with logits that
        are exactly the LM head's (no soft-capping or scaling)? Checked once per model on a tiny input."""
        inner = _unwrap(model)
        if inner not in self._split:
            self._split[inner] = _can_split(inner, self.vocab_size)
        return self._split[inner]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / FSDP / accelerate wrappers (``.module``), keeping a PEFT model as it is."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


@torch.no_grad()
def _can_split(model: nn.Module, vocab_size: int) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return False
    try:
        params = inspect.signature(model.forward).parameters
        if "logits_to_keep" not in params and "kwargs" not in params:
            return False
    except (TypeError, ValueError):
        return False
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = torch.arange(4, device=device)[None] % vocab_size
        full = model(input_ids=ids).logits.float()
        out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long,
                                                                                         device=device))
        split = F.linear(out.hidden_states[-1], head.weight, head.bias).float()
        return out.logits.shape[1] == 0 and full.shape == split.shape and torch.allclose(full, split, atol=1e-4,
                                                                                          rtol=1e-4)
    except Exception:  # a model that does not take these arguments: its logits are used
        return False
    finally:
        model.train(was_training)

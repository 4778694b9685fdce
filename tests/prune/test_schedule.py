"""Gradual pruning: the schedule's sparsity at every step, masks that only grow and stay exact zeros, masked
structured units that compute what their removal computes, and a bit-identical resume mid-schedule."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from chorus.errors import ChorusError
from chorus.prune import GradualPruner, Masks, Schedule, importance, plan_of, remove_masked, structured
from chorus.prune import masks as M
from tests.prune.test_structured import V, batches, tiny

STEPS = 12
WEIGHTS = Schedule("cubic", 0.7, begin=1, end=10, every=2)  # updates at 1, 3, 5, 7, 9; 0.7 from step 10
TWO_FOUR = Schedule("cubic", 0.5, begin=1, end=10, every=2)
UNITS = Schedule("linear", 0.5, begin=0, end=6, every=2)  # share of the parameters removed


def reference(kind: str, target: float, start: float, begin: int, end: int, every: int, stages: int, t: int) -> float:
    """The schedule written from its definition: walk the steps, updating where the paper updates."""
    if kind == "one-shot":
        return target if t >= begin else start
    if kind == "stages":
        lengths = [(end - begin) // stages + (i < (end - begin) % stages) for i in range(stages)]
        first_steps = [begin + sum(lengths[:i]) for i in range(stages)]
        reached = sum(1 for f in first_steps if f <= t)
        return target if t >= end else start + (target - start) * reached / stages
    s = start
    for u in range(t + 1):  # Zhu & Gupta: s_t = s_f + (s_i − s_f)(1 − (t − t0)/(nΔt))³ at t = t0 + kΔt
        if u >= end:
            s = target
        elif u >= begin and (u - begin) % every == 0:
            done = (u - begin) / (end - begin)
            s = start + (target - start) * done if kind == "linear" else target + (start - target) * (1 - done) ** 3
    return s


def step_batch(step: int) -> torch.Tensor:
    return torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(100 + step))


def train(model, pruner: GradualPruner, opt, steps: range, history: list | None = None) -> None:
    """The training loop's contract: update before the forward, apply after the optimizer step."""
    for step in steps:
        pruner.update(step)
        ids = step_batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        pruner.apply()
        opt.zero_grad()
        if history is not None:
            m = pruner.masks
            history.append({"step": step, "keep": {k: v.clone() for k, v in m.masks.items()} if m else None,
                            "zeros": m.zeros_held(model) if m else True})


def run_weights(pattern: str, score: str):
    model = tiny()
    schedule = TWO_FOUR if pattern == "2:4" else WEIGHTS
    pruner = GradualPruner(model, schedule, pattern=pattern, score=score, calibration=batches())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    history: list = []
    train(model, pruner, opt, range(STEPS), history)
    return model, schedule, pruner, history


WEIGHT_CASES = [("unstructured", "magnitude"), ("unstructured", "wanda"), ("2:4", "wanda")]


@pytest.fixture(scope="module", params=WEIGHT_CASES, ids=["magnitude", "wanda", "2:4"])
def weights_run(request):
    return (request.param, *run_weights(*request.param))


# ---------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("kw", [dict(kind="one-shot", target=0.6, begin=3),
                                dict(kind="stages", target=0.6, begin=2, end=12, stages=3),
                                dict(kind="stages", target=0.5, start=0.1, end=7, stages=7),
                                dict(kind="linear", target=0.8, begin=2, end=10, every=3),
                                dict(kind="cubic", target=0.9, start=0.2, begin=1, end=21, every=4),
                                dict(kind="cubic", target=0.5, end=5)])
def test_sparsity_follows_the_schedule_at_every_step(kw):
    sched = Schedule(**kw)
    full = {**dict(start=0.0, begin=0, end=0, every=1, stages=1), **kw}
    for t in range(0, 30):
        assert sched.sparsity_at(t) == pytest.approx(reference(t=t, **full), abs=1e-12), t
    assert sched.sparsity_at(full["end"] + full["begin"] + 40) == kw["target"]  # exactly the target at the end


def test_gradual_masks_prune_exactly_the_scheduled_count_at_every_step(weights_run):
    (pattern, score), model, schedule, _, history = weights_run
    params = M.prunable(model)
    for h in history:
        s = reference(t=h["step"], **schedule.to_dict())
        if h["keep"] is None:
            assert s == 0.0
            continue
        for name, keep in h["keep"].items():
            if score == "magnitude":  # per matrix
                assert int((~keep).sum()) == round(s * keep.numel()), (h["step"], name)
            else:  # per output row
                per_row = (~keep).sum(1)
                assert (per_row == round(s * keep.shape[1])).all(), (h["step"], name)
            if pattern == "2:4":
                assert ((~keep).reshape(keep.shape[0], -1, 4).sum(-1) <= 2).all()
    assert history[-1]["keep"].keys() == params.keys()
    if pattern == "2:4":  # full 2:4 at the end
        assert all(((~k).reshape(k.shape[0], -1, 4).sum(-1) == 2).all() for k in history[-1]["keep"].values())


def test_gradual_masks_only_grow(weights_run):
    *_, history = weights_run
    grew = 0
    for before, after in zip(history, history[1:]):
        if before["keep"] is None:
            continue
        for name, keep in after["keep"].items():
            assert (keep <= before["keep"][name]).all(), (after["step"], name)  # pruned stays pruned
            grew += int((keep != before["keep"][name]).any())
    assert grew > 0


def test_masked_weights_stay_exact_zeros_through_adamw_and_save_load(weights_run, tmp_path):
    _, model, _, pruner, history = weights_run
    assert all(h["zeros"] for h in history)  # after every AdamW step (weight decay included)
    start, now = dict(tiny().named_parameters()), dict(model.named_parameters())
    assert any(not torch.equal(now[n].detach()[keep], start[n].detach()[keep])
               for n, keep in pruner.masks.masks.items())  # the kept weights trained
    model.save_pretrained(tmp_path)
    pruner.masks.save(tmp_path)
    loaded, back = AutoModelForCausalLM.from_pretrained(tmp_path), Masks.load(tmp_path)
    assert back.zeros_held(loaded)
    assert all(torch.equal(back.masks[k], pruner.masks.masks[k].cpu()) for k in pruner.masks.masks)
    assert back.sparsity() == pytest.approx(pruner.sparsity, abs=0.01)


# ---------------------------------------------------------------------------------------------- structured
def run_units():
    model = tiny().double()
    pruner = GradualPruner(model, UNITS, pattern="structured", axes=("heads", "mlp", "layers"),
                           calibration=batches())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    history: list = []
    train(model, pruner, opt, range(8), history)
    return model, pruner, history


@pytest.fixture(scope="module")
def units_run():
    return run_units()


def logits(model, seed: int = 5) -> torch.Tensor:
    ids = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_masked_heads_channels_and_layers_compute_what_removal_computes(units_run):
    model, pruner, _ = units_run
    small = remove_masked(model, pruner.masks)
    c, s = small.config, model.config
    # something went on every axis, and KV groups (GQA: 2 query heads each) went whole
    assert c.num_hidden_layers < s.num_hidden_layers and c.num_key_value_heads < s.num_key_value_heads
    assert c.intermediate_size < s.intermediate_size and c.num_attention_heads == 2 * c.num_key_value_heads
    torch.testing.assert_close(logits(small), logits(model), rtol=0, atol=1e-10)


def test_masks_cover_every_parameter_that_removal_drops(units_run):
    model, pruner, _ = units_run
    small = remove_masked(model, pruner.masks)
    unmasked = sum(p.numel() for n, p in model.named_parameters() if n not in pruner.masks.masks)
    kept = sum(int(m.sum()) for m in pruner.masks.masks.values())
    assert kept + unmasked == sum(p.numel() for p in small.parameters())
    assert pruner.masks.zeros_held(model)


def test_removed_model_reloads_with_from_pretrained(units_run, tmp_path):
    model, pruner, _ = units_run
    small = remove_masked(model, pruner.masks)
    small.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.dtype == torch.float64
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-10)


def test_structured_masks_only_grow_toward_the_target_size(units_run):
    model, _, history = units_run
    plans = [plan_of(model, Masks(h["keep"])) for h in history if h["keep"] is not None]
    for a, b in zip(plans, plans[1:]):
        assert set(b.layers) <= set(a.layers)
        for j, i in enumerate(b.layers):
            k = a.layers.index(i)
            assert set(b.kv_groups[j]) <= set(a.kv_groups[k]) and set(b.channels[j]) <= set(a.channels[k])
    small = remove_masked(model, Masks(history[-1]["keep"]))
    left = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())
    assert abs(left - (1 - UNITS.target)) < 0.05  # the share removed is the schedule's (sizes are rounded)


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("pattern", ["unstructured", "structured"])
def test_resume_mid_schedule_is_bit_identical(pattern, tmp_path):
    schedule = WEIGHTS if pattern == "unstructured" else UNITS
    kw = dict(pattern=pattern, score="wanda" if pattern == "unstructured" else "magnitude", calibration=batches(),
              axes=("heads", "mlp", "layers"))

    def fresh():
        model = tiny()
        pruner = GradualPruner(model, schedule, **kw)
        return model, pruner, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    whole, pw, ow = fresh()
    train(whole, pw, ow, range(STEPS))
    cut = 4 if pattern == "unstructured" else 3  # not an update step: the masks must come from the state
    assert schedule.sparsity_at(cut) == schedule.sparsity_at(cut - 1) > 0
    model, pruner, opt = fresh()
    train(model, pruner, opt, range(cut))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()}, tmp_path / "c.pt")
    del model, pruner, opt
    state = torch.load(tmp_path / "c.pt")
    model, pruner, opt = fresh()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    pruner.load_state_dict(state["pruner"])
    train(model, pruner, opt, range(cut, STEPS))
    a, b = whole.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(pw.masks.masks[k], pruner.masks.masks[k]) for k in pw.masks.masks)


def test_resume_refuses_another_schedule():
    model = tiny()
    state = GradualPruner(model, WEIGHTS).state_dict()
    with pytest.raises(ChorusError, match="differs in: schedule"):
        GradualPruner(model, TWO_FOUR).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, field", [
    (dict(kind="exponential", target=0.5, end=5), "'kind'"),
    (dict(kind="cubic", target=1.0, end=5), "'target'"),
    (dict(kind="cubic", target=0.5, start=0.6, end=5), "'start'"),
    (dict(kind="linear", target=0.5, begin=4, end=4), "'end'.*one-shot"),
    (dict(kind="stages", target=0.5, end=2, stages=3), "'end'.*one step per stage"),
    (dict(kind="cubic", target=0.5, end=5, every=0), "'every'"),
    (dict(kind="stages", target=0.5, end=5, stages=0), "'stages'"),
    (dict(kind="cubic", target=0.5, begin=-1, end=5), "'begin'"),
])
def test_schedule_names_the_bad_field(kw, field):
    with pytest.raises(ChorusError, match=f"schedule {field}"):
        Schedule(**kw)


def test_pruner_refuses_what_it_cannot_do():
    model = tiny()
    with pytest.raises(ChorusError, match="2:4 prunes at most 0.5"):
        GradualPruner(model, WEIGHTS, pattern="2:4")
    with pytest.raises(ChorusError, match="Wanda scores need calibration"):
        GradualPruner(model, WEIGHTS, score="wanda")
    with pytest.raises(ChorusError, match="hidden channels can only be pruned physically"):
        GradualPruner(model, UNITS, pattern="structured", axes=("heads", "hidden"), calibration=batches())
    with pytest.raises(ChorusError, match="cannot reach"):
        GradualPruner(model, Schedule("linear", 0.9, end=4), pattern="structured", axes=("mlp",), calibration=batches())


def test_remove_masked_refuses_masks_that_are_not_whole_units():
    model = tiny()
    with pytest.raises(ChorusError, match="not whole heads, MLP channels or layers"):
        remove_masked(model, M.compute(model, 0.5))
    imp = importance.measure(model, batches(1))
    plan = structured.make_plan(model, imp, kv=1)
    plan.kv_groups[0] = [0, 1]  # one layer keeps both KV groups, the others one
    with pytest.raises(ChorusError, match="every kept layer must keep as many"):
        remove_masked(model, Masks(structured.plan_masks(model, plan)))

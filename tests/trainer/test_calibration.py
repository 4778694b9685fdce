import pytest
import torch

from chorus.distill.calibration import expected_calibration_error, fit_temperature, top1_confidence
from chorus.distill.sparse import SparseDist, from_topk, soften, to_dense
from chorus.errors import ChorusError


def miscalibrated_teacher(true_t: float, n: int = 4000, v: int = 40, k: int = 8, seed: int = 0):
    """Gold ids drawn from q (top-k with its even tail); the teacher reports q sharpened
    (true_t > 1) or flattened (true_t < 1): teacher = soften(q, 1 / true_t)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * 1.5
    top = logits.log_softmax(-1).topk(k)
    q = from_topk(top.indices, top.values, v)
    gold = torch.multinomial(to_dense(q), 1, generator=g)[:, 0]
    return soften(q, 1.0 / true_t), gold


@pytest.mark.parametrize("true_t", [2.0, 0.7])
def test_fit_temperature_recovers_the_miscalibration(true_t):
    teacher, gold = miscalibrated_teacher(true_t)
    fitted = fit_temperature(teacher, gold)
    assert fitted == pytest.approx(true_t, rel=0.05)
    before = expected_calibration_error(*top1_confidence(teacher, gold))
    after = expected_calibration_error(*top1_confidence(soften(teacher, fitted), gold))
    assert after < before


def test_fit_temperature_is_deterministic_and_ignores_minus_100():
    teacher, gold = miscalibrated_teacher(1.5, n=500)
    masked = gold.clone()
    masked[::3] = -100
    keep = masked != -100
    a = fit_temperature(teacher, masked)
    assert a == fit_temperature(teacher, masked)
    assert a == pytest.approx(fit_temperature(teacher.rows(keep), gold[keep]), rel=1e-9)


def test_fit_temperature_stays_within_bounds_and_survives_zero_tails():
    # a zero-tail teacher that always misses the gold: the floor keeps the NLL finite
    v = 10
    dist = SparseDist(torch.tensor([[1, 2]] * 4), torch.log(torch.tensor([[0.9, 0.1]] * 4)), torch.zeros(4), v)
    t = fit_temperature(dist, torch.tensor([5, 5, 1, 5]), bounds=(0.5, 4.0))
    assert 0.5 <= t <= 4.0


def test_fit_temperature_rejects_bad_input():
    teacher, gold = miscalibrated_teacher(1.0, n=10)
    with pytest.raises(ChorusError):
        fit_temperature(teacher, torch.full_like(gold, -100))
    with pytest.raises(ChorusError):
        fit_temperature(teacher, gold, bounds=(2.0, 1.0))


def test_ece_matches_a_hand_computation():
    conf = torch.tensor([0.05, 0.15, 0.15, 0.95, 1.0])
    correct = torch.tensor([False, True, False, True, True])
    # bins (0, .1]: conf .05 acc 0; (.1, .2]: conf .15 acc .5; (.9, 1]: conf .975 acc 1
    expected = (1 * 0.05 + 2 * abs(0.5 - 0.15) + 2 * abs(1 - 0.975)) / 5
    assert expected_calibration_error(conf, correct, n_bins=10) == pytest.approx(expected)


def test_ece_is_zero_when_calibrated_and_validates_shapes():
    conf = torch.tensor([1.0, 1.0, 0.5, 0.5])
    correct = torch.tensor([True, True, True, False])
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0)
    with pytest.raises(ChorusError):
        expected_calibration_error(conf, correct[:3])

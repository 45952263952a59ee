"""Loss values pinned by hand (design section 6) and the method registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from worker.engine import METHODS, EngineError, StepBatch, build_model
from worker.engine.methods import KDConfig, KDLoss, kd_kl, parse_method
from worker.engine.weights import freeze


def test_softmax_at_temperature_matches_worked_value():
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / 2.0, dim=0)
    assert p.tolist() == pytest.approx([0.5065, 0.3072, 0.1863], abs=1e-4)


def test_kl_matches_worked_value():
    # KL([0.8,0.1,0.1] || [0.7,0.2,0.1]) = 0.8 ln(8/7) + 0.1 ln(1/2) = 0.0375 nats.
    p_t = torch.tensor([[0.8, 0.1, 0.1]])
    p_s = torch.tensor([[0.7, 0.2, 0.1]])
    kl = kd_kl(p_s.log(), p_t.log(), temperature=1.0)
    assert kl.item() == pytest.approx(0.0375, abs=1e-4)
    assert kl.item() == pytest.approx(0.8 * math.log(8 / 7) + 0.1 * math.log(0.5), rel=1e-5)


def _kd(alpha, temperature):
    return KDLoss(KDConfig(temperature=temperature, alpha=alpha), num_classes=3, num_teachers=1)


def test_kd_is_t_squared_scaled_kl_at_alpha_one():
    s = torch.tensor([[1.0, 0.5, -1.0], [0.2, 0.1, 0.0]])
    t = torch.tensor([[3.0, 0.0, -2.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 1])
    for temperature in (1.0, 2.0, 4.0):
        total, terms = _kd(1.0, temperature)(StepBatch(s, y, [t]))
        p_t = torch.softmax(t / temperature, -1)
        p_s = torch.softmax(s / temperature, -1)
        by_hand = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
        assert terms["kl"].item() == pytest.approx(by_hand.item(), rel=1e-5)
        assert total.item() == pytest.approx(temperature**2 * by_hand.item(), rel=1e-5)
        assert "ce" not in terms  # alpha = 1 needs no labels


def test_kd_alpha_zero_equals_cross_entropy():
    s = torch.randn(5, 3)
    t = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 1, 0])
    total, terms = _kd(0.0, 4.0)(StepBatch(s, y, [t]))
    assert total.item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_kd_mixes_terms_with_alpha():
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    total, terms = _kd(0.3, 2.0)(StepBatch(s, y, [t]))
    assert total.item() == pytest.approx(0.7 * terms["ce"].item() + 0.3 * 4.0 * terms["kl"].item(), rel=1e-6)


def test_kd_is_zero_when_student_equals_teacher_and_alpha_one():
    z = torch.randn(3, 5)
    total, _ = _kd(1.0, 3.0)(StepBatch(z, None, [z.clone()]))
    assert abs(total.item()) < 1e-6


def test_gradients_do_not_reach_frozen_teacher():
    torch.manual_seed(0)
    teacher = freeze(build_model({"name": "mlp", "config": {"hidden_sizes": [8]}}, (6,), 3))
    student = build_model({"name": "mlp", "config": {"hidden_sizes": [4]}}, (6,), 3)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    with torch.inference_mode():
        t_logits = teacher(x)
    loss, _ = _kd(0.5, 2.0)(StepBatch(student(x), y, [t_logits.clone()]))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert all(p.grad is not None for p in student.parameters())


def test_unknown_method_type_lists_valid_ones():
    with pytest.raises(EngineError) as err:
        parse_method({"type": "magic"}, num_classes=3, num_teachers=1)
    assert err.value.code == "invalid_spec"
    assert err.value.param == "method.type"
    assert "'magic'" in str(err.value) and "kd" in str(err.value) and "supervised" in str(err.value)


def test_method_parameters_are_typed_and_checked():
    with pytest.raises(EngineError) as err:
        parse_method(
            {"type": "kd", "temperature": 4.0, "alpha": 0.5, "beta": 1}, num_classes=3, num_teachers=1
        )
    assert (err.value.code, err.value.param) == ("invalid_spec", "method.beta")
    with pytest.raises(EngineError) as err:
        parse_method({"type": "kd", "temperature": -1.0}, num_classes=3, num_teachers=1)
    assert err.value.param == "method.temperature"
    with pytest.raises(EngineError) as err:
        parse_method({"type": "kd", "alpha": "half"}, num_classes=3, num_teachers=1)
    assert err.value.param == "method.alpha"


def test_kd_teacher_count_is_checked():
    with pytest.raises(EngineError) as err:
        parse_method({"type": "kd"}, num_classes=3, num_teachers=0)
    assert err.value.param == "teachers"
    with pytest.raises(EngineError) as err:
        parse_method({"type": "kd"}, num_classes=3, num_teachers=2)
    assert "multi_teacher" in str(err.value)


def test_registry_has_the_minimum_methods():
    assert {"supervised", "kd"} <= set(METHODS.names())
    for name in METHODS.names():
        doc = METHODS.get(name).__doc__ or ""
        assert "L =" in doc, f"{name}'s docstring must state its formula"

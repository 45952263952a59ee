"""Loss values pinned by hand (design section 6) and the method registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from worker.engine import METHODS, EngineError, StepBatch, build_model, kernels
from worker.engine.methods import KDConfig, KDLoss, distill_loss, kd_kl, parse_method
from worker.engine.trainer import Split, precompute_soft_targets
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
    torch.manual_seed(0)
    z = torch.randn(3, 5)
    total, _ = _kd(1.0, 3.0)(StepBatch(z, None, [z.clone()]))
    # float32 rounding of Σ q·log q − Σ q·log p, times T² = 9: zero up to a few ulps
    assert abs(total.item()) < 1e-5


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


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("soft_labels", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32 on CPU: the fused kernel
def test_closed_form_distill_loss_matches_autograd_of_the_formula(alpha, soft_labels, dtype):
    """``distill_loss`` forms its gradient by hand; it must equal autograd's on the written formula."""
    torch.manual_seed(0)
    t, b, k = 3.0, 16, 7
    z = torch.randn(b, k, dtype=dtype, requires_grad=True)
    q = torch.softmax(torch.randn(b, k, dtype=dtype) / t, dim=-1)
    y = torch.randint(0, k, (b,))
    labels = torch.softmax(torch.randn(b, k, dtype=dtype), -1) if soft_labels else y
    total, terms = distill_loss(z, q, labels, t, alpha)
    (grad,) = torch.autograd.grad(total, z)

    # The reference in float64 from the same inputs: autograd on the formula as written.
    z_ref = z.detach().double().requires_grad_(True)
    q64 = q.double()
    labels64 = labels.double() if soft_labels else labels
    kl = F.kl_div(F.log_softmax(z_ref / t, -1), q64, reduction="batchmean")
    ce = F.cross_entropy(z_ref, labels64)
    reference = alpha * t * t * kl + (1 - alpha) * ce
    (grad_ref,) = torch.autograd.grad(reference, z_ref)

    atol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(total.double(), reference.detach(), atol=atol)
    assert torch.allclose(grad.double(), grad_ref, atol=atol)
    assert torch.allclose(terms["kl"].double(), kl.detach(), atol=atol)
    assert ("ce" in terms) == (alpha < 1)
    if alpha < 1:
        assert torch.allclose(terms["ce"].double(), ce.detach(), atol=atol)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("labels", ["ids", "distribution"])
@pytest.mark.parametrize("batch", [1, 129])
def test_fused_cpu_kernel_matches_the_tensor_version(monkeypatch, alpha, labels, batch):
    """float32 CPU logits go through the Numba kernel; it must give the tensor version's values and gradient."""
    calls = []
    compiled = kernels._compiled
    monkeypatch.setattr(kernels, "_compiled", lambda: calls.append(1) or compiled())
    torch.manual_seed(batch)
    t, k = 4.0, 10
    z = torch.randn(batch, k) * 5
    z[0, :2] = torch.tensor([80.0, -80.0])  # far apart: the max shift must keep exp finite
    q = torch.softmax(torch.randn(batch, k) * 3 / t, dim=-1)
    q[0] = F.one_hot(torch.tensor(3), k).float()  # exact zeros in the targets: 0·log 0 = 0
    y = torch.randint(0, k, (batch,))
    if labels == "distribution":
        y = torch.softmax(torch.randn(batch, k), dim=-1)
    total, kl, ce, grad = kernels.soft_target_terms(z, q, y, t, alpha)
    assert calls, "the float32 CPU case must take the kernel"
    ref = kernels.soft_target_terms_torch(z.double(), q.double(), y if labels == "ids" else y.double(), t, alpha)
    assert total.item() == pytest.approx(ref[0].item(), rel=1e-5, abs=1e-6)
    assert kl.item() == pytest.approx(ref[1].item(), rel=1e-5, abs=1e-6)
    assert (ce is None) == (ref[2] is None) == (alpha == 1.0)
    if ce is not None:
        assert ce.item() == pytest.approx(ref[2].item(), rel=1e-5, abs=1e-6)
    assert grad.dtype == torch.float32
    assert torch.allclose(grad.double(), ref[3], rtol=1e-4, atol=1e-7)


def test_kernel_falls_back_to_tensor_ops_where_it_does_not_apply(monkeypatch):
    """float64 or non-contiguous inputs take the tensor version (the kernel walks raw rows)."""
    monkeypatch.setattr(kernels, "_compiled", lambda: pytest.fail("the kernel must not run"))
    z = torch.randn(8, 5)
    q = torch.softmax(torch.randn(8, 5), dim=-1)
    y = torch.randint(0, 5, (8,))
    kernels.soft_target_terms(z.double(), q.double(), y, 2.0, 0.5)
    kernels.soft_target_terms(torch.randn(5, 8).t(), q, y, 2.0, 0.5)  # a transposed view
    kernels.soft_target_terms(z, torch.softmax(torch.randn(5, 8), dim=-1).t(), y, 2.0, 0.5)


def test_kernel_compiles_without_a_writable_cache(monkeypatch):
    """Numba refuses cache=True where it can write no cache (read-only install, no home): compile per process."""
    import numba

    real_njit = numba.njit

    def njit(*args, cache=False, **kwargs):
        if cache:
            raise RuntimeError("cannot cache function '_soft_target_rows': no locator available")
        return real_njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", njit)
    monkeypatch.setattr(kernels, "_KERNEL", None)
    z = torch.randn(6, 4)
    q = torch.softmax(torch.randn(6, 4), dim=-1)
    y = torch.randint(0, 4, (6,))
    total, _, _, grad = kernels.soft_target_terms(z, q, y, 2.0, 0.5)
    ref = kernels.soft_target_terms_torch(z, q, y, 2.0, 0.5)
    assert kernels._KERNEL is not None
    assert total.item() == pytest.approx(ref[0].item(), rel=1e-5)
    assert torch.allclose(grad, ref[3], atol=1e-6)


def test_kernel_rejects_a_class_id_outside_the_classes():
    """Compiled code has no bounds checks: a bad label must raise, not read past the row."""
    z = torch.randn(4, 3)
    q = torch.full((4, 3), 1 / 3)
    with pytest.raises(IndexError, match="class id"):
        kernels.soft_target_terms(z, q, torch.tensor([0, 1, 3, 2]), 2.0, 0.5)
    with pytest.raises(IndexError, match="class id"):
        kernels.soft_target_terms(z, q, torch.tensor([0, -1, 2, 2]), 2.0, 0.5)


def test_kernel_turns_non_finite_logits_into_a_non_finite_loss():
    """A diverged student must show as NaN/inf in the loss, which the trainer's non-finite check reports."""
    q = torch.full((2, 3), 1 / 3)
    y = torch.tensor([0, 1])
    for bad in (float("nan"), float("inf")):
        z = torch.tensor([[0.0, bad, 1.0], [0.5, 0.1, 0.2]])
        total, *_ = kernels.soft_target_terms(z, q, y, 2.0, 0.5)
        assert not math.isfinite(total.item())


def test_precomputed_soft_targets_give_the_per_step_loss():
    """The trainer's once-per-run soft targets and the per-step ones are the same distribution."""
    torch.manual_seed(1)
    loss = KDLoss(KDConfig(temperature=2.0, alpha=0.5), num_classes=5, num_teachers=1)
    logits = torch.randn(300, 5).half()
    y = torch.randint(0, 5, (300,))
    split = Split(torch.randn(300, 3), y, teacher_logits=[logits])
    pre = precompute_soft_targets(loss, split, [1.0], chunk=64)
    assert pre is not None and pre.shape == (300, 5) and not pre.is_inference()
    z = torch.randn(300, 5)
    a, _ = loss(StepBatch(z, y, [logits.float()], [1.0]))
    b, _ = loss(StepBatch(z, y, [], [1.0], soft_targets=pre))
    assert torch.allclose(a, b, atol=1e-6)
    assert precompute_soft_targets(METHODS.get("dkd")(METHODS.get("dkd").Config(), 5, 1), split, [1.0]) is None

"""Every method's loss pinned to hand-computed values, plus its invariants and where gradients flow.

Pure tensor tests (no training runs): see test_method_runs.py for end-to-end runs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from worker.engine import METHODS, EngineError, StepBatch, build_model
from worker.engine.features import EMBEDDING, FeatureTap, align, check_path
from worker.engine.methods import Probe, dkd_terms, fusion_weights, kd_kl, parse_method
from worker.engine.methods_features import attention_map, normalised_attention, rkd_angles, rkd_distances
from worker.engine.quantization import (
    ActivationQuantizer,
    _pack_int4,
    _unpack_int4,
    fake_quant_activation,
    fake_quant_weight,
    fold,
    prepare_qat,
    quantize_weight,
)
from worker.engine.weights import freeze

ALL_METHODS = {
    "supervised", "kd", "dkd", "multi_teacher", "feature", "attention", "relation", "self_distill",
    "quantization", "cross_modal", "teacher_assistant",
}  # fmt: skip
MLP = {"name": "mlp", "config": {"hidden_sizes": [8, 6]}}
ONE_PAIR = [{"student": "embedding", "teacher": "embedding"}]


def _method(spec: dict, teachers: int = 1):
    return parse_method(spec, num_classes=3, num_teachers=teachers)


def _by_hand_kl(t: torch.Tensor, s: torch.Tensor, temperature: float) -> torch.Tensor:
    p_t, p_s = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
    return (p_t * (p_t / p_s).log()).sum(-1).mean()


# --------------------------------------------------------------------------- registry


def test_every_design_method_is_registered_with_a_cited_formula():
    assert set(METHODS.names()) == ALL_METHODS
    for name in ALL_METHODS:
        doc = METHODS.get(name).__doc__ or ""
        assert "L =" in doc, name
        assert name == "supervised" or any(str(year) in doc for year in range(2014, 2024)), name


# --------------------------------------------------------------------------- dkd


def test_dkd_terms_match_hand_computed_values():
    # z_s = [1, 2, 0] at T = 2 is the worked softmax [0.3072, 0.5065, 0.1863] reordered.
    s, t, y = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([0])
    tckd, nckd, p_target = dkd_terms(s, t, y, 2.0)
    assert tckd.item() == pytest.approx(0.218436, abs=1e-5)
    assert nckd.item() == pytest.approx(0.027955, abs=1e-5)
    assert p_target.item() == pytest.approx(0.628532, abs=1e-5)
    loss = _method({"type": "dkd", "ce_weight": 0.0, "warmup_epochs": 0, "temperature": 2.0})
    total, terms = loss(StepBatch(s, y, [t]))
    assert total.item() == pytest.approx(4.0 * (0.218436 + 8 * 0.027955), abs=1e-4)  # T²·(α·TCKD + β·NCKD)
    assert set(terms) == {"ce", "tckd", "nckd"}


def test_dkd_decomposition_identity_kl_equals_tckd_plus_weighted_nckd():
    # Zhao et al. 2022, eq. 4: KL(p_t || p_s) = TCKD + (1 - p_t,target) * NCKD, per sample, any T.
    torch.manual_seed(0)
    s, t, y = torch.randn(16, 7) * 3, torch.randn(16, 7) * 3, torch.randint(0, 7, (16,))
    for temperature in (1.0, 4.0):
        tckd, nckd, p_target = dkd_terms(s, t, y, temperature)
        kl = (
            torch.softmax(t / temperature, -1)
            * (torch.log_softmax(t / temperature, -1) - torch.log_softmax(s / temperature, -1))
        ).sum(-1)
        torch.testing.assert_close(tckd + (1 - p_target) * nckd, kl, rtol=1e-5, atol=1e-6)


def test_dkd_with_alpha_one_and_beta_one_minus_teacher_confidence_is_kd():
    # With beta = 1 - p_t (one sample, so one value) DKD's distillation part is exactly KD's T²·KL.
    s, t, y = torch.tensor([[0.5, -1.0, 2.0, 0.1]]), torch.tensor([[2.0, 0.0, 1.0, -1.0]]), torch.tensor([0])
    _, _, p_target = dkd_terms(s, t, y, 3.0)
    dkd = _method({"type": "dkd", "alpha": 1.0, "beta": 1.0 - p_target.item(), "ce_weight": 0.0,
                   "temperature": 3.0, "warmup_epochs": 0})  # fmt: skip
    kd = _method({"type": "kd", "alpha": 1.0, "temperature": 3.0})
    assert dkd(StepBatch(s, y, [t]))[0].item() == pytest.approx(kd(StepBatch(s, y, [t]))[0].item(), rel=1e-5)


def test_dkd_warmup_ramps_the_distillation_terms_linearly():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    loss = _method({"type": "dkd", "ce_weight": 0.0, "warmup_epochs": 4})
    full = loss(StepBatch(s, y, [t], epoch=10))[0].item()
    assert [loss(StepBatch(s, y, [t], epoch=e))[0].item() for e in range(4)] == pytest.approx(
        [full / 4, full / 2, 3 * full / 4, full], rel=1e-5
    )


# --------------------------------------------------------------------------- multi_teacher


def test_multi_teacher_fusions():
    s = torch.tensor([[0.0, 1.0, -1.0], [1.0, 0.0, 0.0]])
    t1, t2 = (
        torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]),
        torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 3.0]]),
    )
    y = torch.tensor([0, 2])
    p1, p2 = torch.softmax(t1 / 2, -1), torch.softmax(t2 / 2, -1)

    def kl_to(target):
        log_p_s = torch.log_softmax(s / 2, -1)
        return (target * (target.log() - log_p_s)).sum(-1).mean().item()

    mean = _method({"type": "multi_teacher", "fusion": "mean", "temperature": 2.0, "alpha": 1.0}, 2)
    assert mean(StepBatch(s, y, [t1, t2]))[1]["kl"].item() == pytest.approx(kl_to((p1 + p2) / 2), rel=1e-5)
    weighted = _method({"type": "multi_teacher", "fusion": "weighted", "temperature": 2.0, "alpha": 1.0}, 2)
    total, terms = weighted(StepBatch(s, y, [t1, t2], teacher_weights=[3.0, 1.0]))
    assert terms["kl"].item() == pytest.approx(kl_to(0.75 * p1 + 0.25 * p2), rel=1e-5)
    assert total.item() == pytest.approx(4.0 * terms["kl"].item(), rel=1e-6)  # T² scaling


def test_confidence_weights_prefer_the_teacher_with_lower_label_cross_entropy():
    # softmax over -CE_k = softmax over log p_k(y): each teacher weighs its probability of the label.
    t1, t2 = (
        torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        torch.tensor([[0.0, 0.0, 0.0], [0.0, 3.0, 0.0]]),
    )
    y = torch.tensor([0, 1])
    w = fusion_weights("confidence", [t1, t2], [], y)
    p = torch.stack(
        [torch.softmax(t1, -1)[torch.arange(2), y], torch.softmax(t2, -1)[torch.arange(2), y]], -1
    )
    torch.testing.assert_close(w, p / p.sum(-1, keepdim=True))
    assert w[0, 0] > 0.5 > w[1, 0]  # the first teacher is right on row 0, the second on row 1
    assert _method({"type": "multi_teacher", "fusion": "confidence", "alpha": 1.0}, 2).requires_labels
    assert not _method({"type": "multi_teacher", "alpha": 1.0}, 2).requires_labels


def test_multi_teacher_needs_two_teachers_and_a_known_fusion():
    with pytest.raises(EngineError) as err:
        _method({"type": "multi_teacher"}, 1)
    assert err.value.param == "teachers" and "at least 2" in str(err.value)
    with pytest.raises(EngineError) as err:
        _method({"type": "multi_teacher", "fusion": "max"}, 2)
    assert err.value.param == "method.fusion" and "confidence" in str(err.value)


# --------------------------------------------------------------------------- T² scaling, shared by KD-based methods


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "kd"},
        {"type": "cross_modal"},
        {"type": "quantization"},
        {"type": "teacher_assistant", "assistants": [MLP]},
        {"type": "multi_teacher"},
        {"type": "feature", "beta": 0.0},
        {"type": "attention", "beta": 0.0, "pairs": ONE_PAIR},
        {"type": "relation", "distance_weight": 0.0, "angle_weight": 0.0},
    ],
    ids=lambda s: s["type"],
)
def test_distillation_term_is_t_squared_scaled_kl(spec):
    torch.manual_seed(1)
    s, t, y = torch.randn(6, 3), torch.randn(6, 3), torch.randint(0, 3, (6,))
    feats = {EMBEDDING: torch.randn(6, 4)}
    for temperature in (1.0, 2.0, 5.0):
        n = 2 if spec["type"] == "multi_teacher" else 1
        loss = _method({**spec, "temperature": temperature, "alpha": 1.0}, n)
        if spec["type"] == "feature":  # an identity regressor: the hint term is weighted 0 anyway
            loss.regressors = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
        batch = StepBatch(s, y, [t] * n, student_features=feats, teacher_features=[feats] * n)
        total, terms = loss(batch)
        assert terms["kl"].item() == pytest.approx(_by_hand_kl(t, s, temperature).item(), rel=1e-5)
        assert total.item() == pytest.approx(temperature**2 * terms["kl"].item(), rel=1e-5)
        assert "ce" not in terms


# --------------------------------------------------------------------------- feature (FitNets)


def _pair_models():
    torch.manual_seed(0)
    teacher = freeze(build_model({"name": "cnn2d", "config": {"channels": [6, 10]}}, (1, 8, 8), 3))
    student = build_model({"name": "cnn2d", "config": {"channels": [4, 5]}}, (1, 8, 8), 3)
    return teacher, student


def test_fitnets_hint_value_and_regressor_shapes():
    loss = _method({"type": "feature", "beta": 2.0, "alpha": 1.0})
    loss.regressors = torch.nn.ModuleList([torch.nn.Linear(2, 2, bias=False)])
    with torch.no_grad():
        loss.regressors[0].weight.copy_(torch.eye(2))
    fs, ft = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)
    z = torch.zeros(1, 3)
    total, terms = loss(
        StepBatch(z, None, [z], student_features={EMBEDDING: fs}, teacher_features=[{EMBEDDING: ft}])
    )
    assert terms["hint"].item() == pytest.approx(2.5)  # mean((1 - 0)², (2 - 0)²)
    assert total.item() == pytest.approx(2.0 * 2.5)  # KL is 0 for equal logits

    teacher, student = _pair_models()
    x = torch.randn(4, 1, 8, 8)
    pairs = [{"student": "net.2", "teacher": "net.2"},  # [4, 8, 8] → [6, 8, 8]
             {"student": "net.3", "teacher": "net.2"},  # [4, 4, 4] vs [6, 8, 8]: the teacher map is pooled
             {"student": "embedding", "teacher": "net.6"}]  # [5] vs [10, 2, 2]: globally pooled, linear  # fmt: skip
    loss = _method({"type": "feature", "pairs": pairs})
    loss.setup(student, [teacher], Probe(x, [x]))
    assert [type(r).__name__ for r in loss.regressors] == ["Conv2d", "Conv2d", "Linear"]
    assert (loss.regressors[1].in_channels, loss.regressors[1].out_channels) == (4, 6)
    assert (loss.regressors[2].in_features, loss.regressors[2].out_features) == (5, 10)
    fs, ft = align(torch.randn(2, 4, 4, 4), torch.randn(2, 6, 8, 8))
    assert fs.shape == (2, 4, 4, 4) and ft.shape == (2, 6, 4, 4)


def test_fitnets_gradients_reach_student_and_regressor_but_not_the_teacher():
    teacher, student = _pair_models()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    loss = _method({"type": "feature", "pairs": [{"student": "net.3", "teacher": "net.3"}]})
    loss.setup(student, [teacher], Probe(x, [x]))
    with FeatureTap(student, loss.student_taps) as s_tap, FeatureTap(teacher, loss.teacher_taps) as t_tap:
        with torch.inference_mode():
            t_logits = teacher(x)
            t_feats = t_tap.take()
        logits = student(x)
        batch = StepBatch(logits, y, [t_logits.clone()], student_features=s_tap.take(),
                          teacher_features=[{k: v.clone() for k, v in t_feats.items()}])  # fmt: skip
        _total, terms = loss(batch)
    terms["hint"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in loss.regressors.parameters())
    assert student.net[0].weight.grad is not None and student.net[0].weight.grad.abs().sum() > 0
    assert student.head.weight.grad is None  # the hint is upstream of the head


def test_bad_module_path_names_it_and_lists_valid_paths():
    teacher, student = _pair_models()
    x = torch.randn(2, 1, 8, 8)
    loss = _method({"type": "feature", "pairs": [{"student": "net.3", "teacher": "net.3"},
                                                 {"student": "net.99", "teacher": "net.3"}]})  # fmt: skip
    with pytest.raises(EngineError) as err:
        loss.setup(student, [teacher], Probe(x, [x]))
    assert (err.value.code, err.value.param) == ("invalid_spec", "method.pairs[1].student")
    assert (
        "'net.99'" in str(err.value)
        and "embedding, net, net.0" in str(err.value)
        and "head" in str(err.value)
    )
    loss = _method({"type": "attention", "pairs": [{"student": "net.3", "teacher": "layer9"}]})
    with pytest.raises(EngineError) as err:
        loss.setup(student, [teacher], Probe(x, [x]))
    assert err.value.param == "method.pairs[0].teacher" and "teacher 0 has no module 'layer9'" in str(
        err.value
    )
    with pytest.raises(EngineError) as err:
        check_path(student, "", who="the student", param="p")
    with pytest.raises(EngineError) as err:
        _method({"type": "feature", "pairs": [{"student": "net.1"}]})
    assert err.value.param == "method.pairs[0].teacher"


def test_feature_tap_transposes_channels_last_sequences():
    model = build_model({"name": "transformer", "config": {"d_model": 8, "n_heads": 2}}, (5,), 3)
    with FeatureTap(model, ["blocks.0", EMBEDDING]) as tap:
        model(torch.randn(2, 5))
        feats = tap.take()
    assert feats["blocks.0"].shape == (2, 8, 5) and feats[EMBEDDING].shape == (2, 8)
    assert not model.head._forward_pre_hooks  # closed taps leave no hooks behind


# --------------------------------------------------------------------------- attention


def test_attention_map_and_loss_by_hand():
    a = torch.tensor([[[[1.0, 2.0]], [[2.0, 0.0]]]])  # [B=1, C=2, H=1, W=2]
    q = attention_map(a)
    assert q.tolist() == [[[5.0, 4.0]]]  # Σ_c A_c²
    qs, _qt = normalised_attention(q, torch.tensor([[[1.0, 0.0]]]))
    assert qs.norm(dim=1).item() == pytest.approx(1.0) and qs[0].tolist() == pytest.approx(
        [5 / 41**0.5, 4 / 41**0.5]
    )
    loss = _method({"type": "attention", "alpha": 1.0, "pairs": [{"student": "a", "teacher": "b"}]})
    z = torch.zeros(1, 3)
    total, _terms = loss(StepBatch(z, None, [z], student_features={"a": a},
                                  teacher_features=[{"b": torch.tensor([[[[1.0, 0.0]]]])}]))  # fmt: skip
    assert total.item() == pytest.approx(109.5656, rel=1e-4)  # 1000/2 · mean((5/√41 − 1)², (4/√41)²)


def test_attention_maps_are_normalised_and_pooled_to_the_smaller_size():
    torch.manual_seed(0)
    qs, qt = normalised_attention(
        attention_map(torch.randn(3, 4, 8, 8)), attention_map(torch.randn(3, 16, 4, 4))
    )
    assert qs.shape == qt.shape == (3, 16)
    torch.testing.assert_close(qs.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(qt.norm(dim=1), torch.ones(3))
    qs, qt = normalised_attention(attention_map(torch.randn(3, 4, 8, 8)), attention_map(torch.randn(3, 10)))
    assert qs.shape == qt.shape == (3, 10)
    # Scale invariance: the normalised map of c·A equals that of A.
    a = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(normalised_attention(attention_map(a), attention_map(a))[0],
                               normalised_attention(attention_map(7 * a), attention_map(a))[0])  # fmt: skip


def test_attention_requires_pairs():
    with pytest.raises(EngineError) as err:
        _method({"type": "attention"})
    assert err.value.param == "method.pairs"


# --------------------------------------------------------------------------- relation (RKD)


def test_rkd_potentials_by_hand():
    e = torch.tensor([[0.0], [1.0], [3.0]])  # distances 1, 3, 2: mean 2
    d = rkd_distances(e)
    torch.testing.assert_close(
        d, torch.tensor([[0.0, 0.5, 1.5], [0.5, 0.0, 1.0], [1.5, 1.0, 0.0]]), atol=1e-5, rtol=0
    )
    a = rkd_angles(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    assert a[0, 1, 2].item() == pytest.approx(0.0, abs=1e-6)  # a right angle at point 0
    assert a[1, 0, 2].item() == pytest.approx(math.cos(math.pi / 4), abs=1e-6)  # 45° at point 1


def _relation_terms(fs, ft, **options):
    loss = _method({"type": "relation", "alpha": 1.0, **options})
    z = torch.zeros(len(fs), 3)
    return loss(StepBatch(z, None, [z], student_features={EMBEDDING: fs}, teacher_features=[{EMBEDDING: ft}]))


def test_rkd_is_zero_for_identical_embeddings_and_invariant_to_scale():
    torch.manual_seed(0)
    e = torch.randn(8, 5)
    _, terms = _relation_terms(e, e.clone())
    assert terms["distance"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["angle"].item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(8, 7)  # widths may differ: relations need no projection
    _, base = _relation_terms(e, other)
    _, scaled = _relation_terms(10 * e, 0.1 * other)
    assert base["distance"].item() > 0 and base["angle"].item() > 0
    assert scaled["distance"].item() == pytest.approx(base["distance"].item(), rel=1e-4)
    assert scaled["angle"].item() == pytest.approx(base["angle"].item(), rel=1e-4)
    total, terms = _relation_terms(e, other)
    assert total.item() == pytest.approx(25 * terms["distance"].item() + 50 * terms["angle"].item(), rel=1e-5)


def test_rkd_skips_a_term_whose_weight_is_zero(monkeypatch):
    """RKD-D alone must not pay for the O(B³·D) angle potentials."""
    from worker.engine import methods_features

    calls = []
    monkeypatch.setattr(methods_features, "rkd_angles", lambda e: calls.append(e) or rkd_angles(e))
    e, other = torch.randn(8, 5), torch.randn(8, 5)
    total, terms = _relation_terms(e, other, angle_weight=0.0)
    assert calls == [] and terms["angle"].item() == 0.0 and terms["distance"].item() > 0
    assert total.item() == pytest.approx(25 * terms["distance"].item(), rel=1e-5)
    _relation_terms(e, other)
    assert len(calls) == 2  # student and teacher, with the default weights


def test_rkd_gradients_reach_the_student_embedding():
    e = torch.randn(6, 4, requires_grad=True)
    _, terms = _relation_terms(e, torch.randn(6, 4))
    (terms["distance"] + terms["angle"]).backward()
    assert e.grad is not None and torch.isfinite(e.grad).all() and e.grad.abs().sum() > 0


# --------------------------------------------------------------------------- self_distill


def test_self_distill_exits_learn_from_the_final_head_only():
    torch.manual_seed(0)
    student = build_model({"name": "mlp", "config": {"hidden_sizes": [8, 6]}}, (5,), 3)
    loss = _method({"type": "self_distill", "alpha": 1.0, "feature_weight": 0.0}, 0)
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    loss.setup(student, [], Probe(x))
    assert loss.exits == ["net.1"] and len(loss.heads) == 1
    assert loss.heads[0].project.out_features == 6  # the final embedding's width
    with FeatureTap(student, loss.student_taps) as tap:
        logits = student(x)
        total, terms = loss(StepBatch(logits, y, student_features=tap.take()))
    assert set(terms) == {"ce", "exit_ce", "exit_kl", "exit_feature"}
    terms["exit_kl"].backward()
    assert student.head.weight.grad is None  # the deepest head teaches; it is not pulled toward the exit
    assert loss.heads[0].classify.weight.grad is not None
    assert student.net[0].weight.grad is not None  # the shared trunk learns from its exit
    # Value: CE(final) + Σ_exits [(1 − α)·CE + α·T²·KL + λ·MSE] with α = 1, λ = 0.
    assert total.item() == pytest.approx(terms["ce"].item() + 9.0 * terms["exit_kl"].item(), rel=1e-5)


def test_self_distill_born_again_term_and_generations():
    loss = _method({"type": "self_distill", "generations": 3, "exits": []}, 0)
    stages = loss.stages()
    assert [s.name for s in stages] == ["generation 1", "generation 2", "generation 3"]
    assert [s.teachers for s in stages] == ["none", "previous", "previous"] and stages[-1].loss is loss
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    total, _terms = loss(StepBatch(s, y, [t]))
    assert total.item() == pytest.approx(
        0.5 * F.cross_entropy(s, y).item() + 0.5 * 9 * kd_kl(s, t, 3.0).item(), rel=1e-5
    )
    with pytest.raises(EngineError) as err:  # one generation and no exit is plain supervised training
        _method({"type": "self_distill", "exits": []}, 0).setup(
            build_model(MLP, (5,), 3), [], Probe(torch.randn(2, 5))
        )
    assert err.value.param == "method.exits"


def test_default_exits_come_from_the_architecture():
    for arch, shape, exits in [
        ({"name": "mlp", "config": {"hidden_sizes": [8, 8, 8]}}, (5,), ["net.1", "net.3"]),
        ({"name": "cnn1d", "config": {"channels": 4}}, (20,), ["net.2", "net.5"]),
        ({"name": "cnn2d", "config": {"channels": [4, 4]}}, (1, 8, 8), ["net.3"]),
        ({"name": "resnet_cifar", "config": {"depth": 8}}, (1, 8, 8), ["layer1", "layer2"]),
        ({"name": "transformer", "config": {"d_model": 8, "n_heads": 2, "n_layers": 2}}, (6,), ["blocks.0"]),
    ]:
        model = build_model(arch, shape, 3)
        loss = _method({"type": "self_distill"}, 0)
        loss.setup(model, [], Probe(torch.randn(2, *shape)))
        assert loss.exits == exits, arch["name"]


# --------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_fake_quant_round_trip_error_is_within_half_a_step(bits):
    torch.manual_seed(0)
    w = torch.randn(5, 7, 3)
    q, scale = quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.abs().max().item() == qmax  # each channel's max hits the grid's end
    step = scale.view(-1, 1, 1)
    deq = q.float() * step
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    torch.testing.assert_close(fake_quant_weight(w, bits), deq)
    assert torch.equal(_unpack_int4(_pack_int4(q), list(q.shape)), q) if bits == 4 else True


def test_weight_ste_gradient_is_identity():
    w = torch.randn(4, 6, requires_grad=True)
    g = torch.randn(4, 6)
    fake_quant_weight(w, 4).backward(g)
    torch.testing.assert_close(w.grad, g)


def test_activation_fake_quant_bounds_and_clipped_ste():
    lo, hi = torch.tensor(-1.0), torch.tensor(3.0)
    x = torch.tensor([-2.0, -1.0, -0.3, 0.0, 1.234, 3.0, 5.0], requires_grad=True)
    out = fake_quant_activation(x, lo, hi, 8)
    step = 4.0 / 255
    inside = (x >= lo) & (x <= hi)
    assert ((out - x).abs()[inside] <= step / 2 + 1e-6).all()
    assert out[0].item() == pytest.approx(-1.0, abs=step) and out[-1].item() == pytest.approx(3.0, abs=step)
    assert out[3].item() == 0.0  # zero is exactly representable
    out.sum().backward()
    assert x.grad.tolist() == inside.float().tolist()  # identity inside the clip range, zero outside


def test_activation_quantizer_tracks_a_running_range():
    q = ActivationQuantizer(8)
    q.eval()
    x = torch.randn(10)
    assert torch.equal(q(x), x)  # no range yet: pass-through
    q.train()
    q(torch.tensor([0.5, 2.0]))
    assert (q.min_val.item(), q.max_val.item()) == (0.0, 2.0)  # the range always contains 0
    q(torch.tensor([-10.0, 12.0]))
    assert q.min_val.item() == pytest.approx(-1.0) and q.max_val.item() == pytest.approx(
        3.0
    )  # EMA, momentum 0.1


def test_qat_keeps_module_paths_and_fold_returns_the_plain_architecture():
    torch.manual_seed(0)
    model = build_model({"name": "cnn2d", "config": {"channels": [4, 4]}}, (1, 6, 6), 3)
    keys = set(model.state_dict())
    x = torch.randn(5, 1, 6, 6)
    qat = prepare_qat(model, 8)
    assert keys < set(qat.state_dict()) and "head.act.min_val" in qat.state_dict()
    qat.train()
    qat(x)
    folded = fold(qat)
    assert set(folded.state_dict()) == keys and type(folded.head) is torch.nn.Linear
    q, scale = quantize_weight(qat.head.weight, 8)
    torch.testing.assert_close(folded.head.weight, q.float() * scale.view(-1, 1))
    qat.eval()
    folded.eval()
    assert (qat(x) - folded(x)).abs().max().item() < 0.1  # only the 8-bit activations differ


# --------------------------------------------------------------------------- API and engine agree


def test_api_method_schemas_match_the_engine_configs():
    """Same names, same options, same defaults on both sides (the API never imports the engine)."""
    import dataclasses
    import typing

    from app.schemas import TEACHERLESS_METHODS, Method

    api = {typing.get_args(cls.model_fields["type"].annotation)[0]: cls
           for cls in typing.get_args(typing.get_args(Method)[0])}  # fmt: skip
    assert set(api) == set(METHODS.names())
    for name, cls in api.items():
        engine = METHODS.get(name)
        fields = {f.name: f for f in dataclasses.fields(engine.Config)}
        assert set(cls.model_fields) - {"type"} == set(fields), name
        defaults = engine.Config(**({"pairs": ONE_PAIR} if name == "attention" else {})
                                 | ({"assistants": [MLP]} if name == "teacher_assistant" else {}))  # fmt: skip
        for key, f in cls.model_fields.items():
            if key == "type" or f.is_required():
                continue
            api_default = cls.model_validate({"type": name, **({"pairs": ONE_PAIR} if name == "attention" else {}),
                                              **({"assistants": [MLP]} if name == "teacher_assistant" else {})})  # fmt: skip
            assert api_default.model_dump(mode="json")[key] == getattr(defaults, key), (name, key)
        assert (name in TEACHERLESS_METHODS) == (not engine.uses_teachers), name
        assert cls.needs_x_teacher == (engine.teacher_input == "x_teacher"), name
        extra = (
            {"pairs": ONE_PAIR}
            if name == "attention"
            else {"assistants": [MLP]}
            if name == "teacher_assistant"
            else {}
        )
        for options in ({}, {"alpha": 1.0}, {"alpha": 0.3}, {"alpha": 1.0, "fusion": "confidence"}):
            if not set(options) <= set(fields):
                continue
            spec = {"type": name, **extra, **options}
            teachers = 2 if name == "multi_teacher" else int(engine.uses_teachers)
            engine_needs = parse_method(spec, num_classes=3, num_teachers=teachers).requires_labels
            assert cls.model_validate(spec).needs_labels() == engine_needs, spec

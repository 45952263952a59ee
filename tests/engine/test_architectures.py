"""Every architecture builds and runs on its input kinds; weights load strictly; ONNX matches torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from worker.engine import ARCHITECTURES, EngineError, build_model, count_parameters, read_model_metadata
from worker.engine.export import export_onnx
from worker.engine.weights import load_weights_strict, save_model

# (architecture, per-sample input shape); token models get int64 ids.
CASES = [
    ({"name": "mlp", "config": {"hidden_sizes": [16, 8], "dropout": 0.1}}, (12,)),
    ({"name": "mlp", "config": {}}, (2, 5, 5)),
    ({"name": "cnn1d", "config": {"channels": 8, "num_layers": 2, "kernel_size": 3}}, (40,)),
    ({"name": "cnn1d", "config": {"channels": 8, "num_layers": 3}}, (3, 21)),
    ({"name": "cnn2d", "config": {"channels": [8, 16]}}, (3, 16, 16)),
    ({"name": "cnn2d", "config": {"channels": [4]}}, (8, 8)),
    ({"name": "resnet_cifar", "config": {"depth": 8, "width": 1}}, (3, 16, 16)),
    ({"name": "resnet_cifar", "config": {"depth": 14, "width": 2}}, (1, 8, 8)),
    ({"name": "transformer", "config": {"d_model": 16, "n_heads": 2, "n_layers": 2}}, (20,)),
    ({"name": "transformer", "config": {"d_model": 16, "n_heads": 4, "n_layers": 1}}, (3, 10)),
    (
        {"name": "transformer", "config": {"d_model": 16, "n_heads": 2, "n_layers": 1, "vocab_size": 50}},
        (12,),
    ),
]
IDS = [
    f"{a['name']}-{'x'.join(map(str, s))}" + ("-tokens" if "vocab_size" in a["config"] else "")
    for a, s in CASES
]


def _inputs(model, shape, batch):
    if model.input_dtype == torch.int64:
        return torch.randint(0, model.embed.num_embeddings, (batch, *shape))
    return torch.randn(batch, *shape)


def test_registry_has_the_minimum_set():
    assert {"mlp", "cnn1d", "cnn2d", "resnet_cifar", "transformer"} <= set(ARCHITECTURES.names())
    # hf builds from a transformers config resolved from its teacher's (tests/engine/test_hf.py).
    for name in sorted(set(ARCHITECTURES.names()) - {"hf"}):
        assert build_model(
            {"name": name, "config": {}}, (3, 8, 8) if "2d" in name or "resnet" in name else (16,), 5
        )


@pytest.mark.parametrize("arch,shape", CASES, ids=IDS)
def test_builds_forwards_and_backprops(arch, shape):
    torch.manual_seed(0)
    model = build_model(arch, shape, num_classes=7)
    x = _inputs(model, shape, 5)
    logits = model(x)
    assert logits.shape == (5, 7)
    assert model.forward_features(x).ndim == 2
    logits.sum().backward()
    assert count_parameters(model) > 0
    assert model.architecture["name"] == arch["name"]


@pytest.mark.parametrize("arch,shape", CASES, ids=IDS)
def test_onnx_matches_torch_for_batch_1_and_7(arch, shape, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_model(arch, shape, num_classes=7)
    # Train-mode steps give BatchNorm non-trivial running statistics to export.
    model.train()
    with torch.no_grad():
        model(
            _inputs(model, shape, 8) * 2 + 0.5
            if model.input_dtype != torch.int64
            else _inputs(model, shape, 8)
        )
    model.eval()
    info = export_onnx(model, _inputs(model, shape, 3), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx.data").exists()  # one self-contained file
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for batch in (1, 7):
        x = _inputs(model, shape, batch)
        got = session.run(["logits"], {"x": x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (batch, 7)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert info["max_abs_diff"] < 1e-4


def test_unknown_config_key_names_it():
    with pytest.raises(EngineError) as err:
        build_model(
            {"name": "mlp", "config": {"hidden_size": [8]}}, (4,), 3, param_prefix="student.architecture"
        )
    assert err.value.code == "invalid_architecture"
    assert err.value.param == "student.architecture.config.hidden_size"
    assert "hidden_sizes" in str(err.value)


def test_unknown_architecture_lists_valid_ones():
    with pytest.raises(EngineError) as err:
        build_model({"name": "vgg", "config": {}}, (4,), 3)
    assert err.value.code == "invalid_architecture"
    assert "'vgg'" in str(err.value) and "resnet_cifar" in str(err.value)


def test_bad_values_and_shapes_are_rejected():
    cases = [
        ({"name": "resnet_cifar", "config": {"depth": 10}}, (3, 8, 8), "architecture.config.depth"),
        (
            {"name": "transformer", "config": {"d_model": 10, "n_heads": 4}},
            (8,),
            "architecture.config.n_heads",
        ),
        ({"name": "mlp", "config": {"hidden_sizes": "big"}}, (8,), "architecture.config.hidden_sizes"),
        ({"name": "cnn2d", "config": {}}, (8,), "architecture.name"),
        ({"name": "cnn1d", "config": {}}, (3, 8, 8), "architecture.name"),
    ]
    for arch, shape, param in cases:
        with pytest.raises(EngineError) as err:
            build_model(arch, shape, 3)
        assert (err.value.code, err.value.param) == ("invalid_architecture", param), arch


def _save(model, path, **overrides):
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    tensors.update(overrides)
    save_file(tensors, str(path))


def test_weights_load_strictly(tmp_path):
    arch = {"name": "mlp", "config": {"hidden_sizes": [32]}}
    source = build_model(arch, (10,), 4)
    _save(source, tmp_path / "ok.safetensors")
    target = build_model(arch, (10,), 4)
    load_weights_strict(target, tmp_path / "ok.safetensors", who="teacher 0")
    for k, v in source.state_dict().items():
        assert torch.equal(v, target.state_dict()[k])


def test_shape_mismatch_names_the_first_bad_key(tmp_path):
    small = build_model({"name": "mlp", "config": {"hidden_sizes": [32]}}, (10,), 4)
    big = build_model({"name": "mlp", "config": {"hidden_sizes": [64]}}, (10,), 4)
    _save(big, tmp_path / "big.safetensors")
    with pytest.raises(EngineError) as err:
        load_weights_strict(small, tmp_path / "big.safetensors", who="teacher 0")
    assert err.value.code == "weights_mismatch"
    assert str(err.value) == "teacher 0: key 'net.0.weight' has shape [64, 10], architecture expects [32, 10]"


def test_missing_and_unexpected_keys_are_named(tmp_path):
    model = build_model({"name": "mlp", "config": {"hidden_sizes": [8]}}, (5,), 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["head.bias"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(EngineError, match="'head.bias' is missing"):
        load_weights_strict(model, tmp_path / "missing.safetensors", who="teacher 0")
    _save(model, tmp_path / "extra.safetensors", **{"extra.weight": torch.zeros(2)})
    with pytest.raises(EngineError, match="'extra.weight'.*not part of the architecture") as err:
        load_weights_strict(model, tmp_path / "extra.safetensors", who="teacher 0")
    assert err.value.code == "weights_mismatch"


def test_non_safetensors_weights_are_rejected(tmp_path):
    model = build_model({"name": "mlp", "config": {}}, (5,), 3)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)  # a pickle-based file must never be accepted
    with pytest.raises(EngineError) as err:
        load_weights_strict(model, path, who="teacher 0")
    assert err.value.code == "weights_mismatch"


def test_saved_model_metadata_round_trips(tmp_path):
    model = build_model({"name": "cnn1d", "config": {"channels": 4}}, (16,), 3)
    save_model(
        model,
        tmp_path / "model.safetensors",
        {
            "architecture": model.architecture,
            "input_shape": [16],
            "num_classes": 3,
            "job_id": "job_x",
            "method": {"type": "kd"},
            "val_accuracy": 0.5,
        },
    )
    meta = read_model_metadata(tmp_path / "model.safetensors")
    assert meta["architecture"] == {
        "name": "cnn1d",
        "config": {"channels": 4, "num_layers": 3, "kernel_size": 5, "dropout": 0.0},
    }
    assert (meta["input_shape"], meta["num_classes"], meta["job_id"]) == ([16], 3, "job_x")
    rebuilt = build_model(meta["architecture"], tuple(meta["input_shape"]), meta["num_classes"])
    load_weights_strict(rebuilt, tmp_path / "model.safetensors", who="teacher 0")

"""`distill convert`: PyTorch checkpoints → safetensors on the user's machine (torch is installed for the tests)."""

import hashlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from app import cli
from distill_tools.convert import ConversionError, convert_checkpoint

runner = CliRunner()


class Thing:
    """A pickled object that is not a tensor: weights_only loading must refuse it."""

    def __init__(self):
        self.lr = 0.1


def small_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    return model.state_dict()


def convert(*args: str):
    return runner.invoke(cli.app, ["convert", *args])


def assert_same(path, expected: dict) -> None:
    got = load_file(str(path))
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_plain_state_dict_round_trip(tmp_path):
    state = small_state()
    torch.save(state, tmp_path / "model.pt")
    result = convert(str(tmp_path / "model.pt"))
    assert result.exit_code == 0, result.output
    out = tmp_path / "model.safetensors"
    assert_same(out, state)
    params = sum(v.numel() for v in state.values())
    assert f"tensors     {len(state)}" in result.stdout and f"parameters  {params:,}" in result.stdout
    assert hashlib.sha256(out.read_bytes()).hexdigest() in result.stdout
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", "source": "model.pt"}


def test_wrapped_checkpoint_with_dataparallel_prefix(tmp_path):
    state = small_state()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 7,
               "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}  # fmt: skip
    torch.save(wrapped, tmp_path / "ckpt.pth")
    result = convert(str(tmp_path / "ckpt.pth"), "-o", str(tmp_path / "out" / "teacher.safetensors"))
    assert result.exit_code == 0, result.output
    assert_same(tmp_path / "out" / "teacher.safetensors", state)
    assert "'state_dict'" in result.stderr and "epoch, optimizer" in result.stderr
    assert "'module.'" in result.stderr


def test_nested_wrappers_compile_prefix_and_choosing_the_key(tmp_path):
    state = small_state()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"model": {"state_dict": {f"_orig_mod.{k}": v for k, v in state.items()}}, "ema": ema},
               tmp_path / "c.pt")  # fmt: skip
    report = convert_checkpoint(tmp_path / "c.pt")
    assert report.unwrapped == ["model", "state_dict"] and report.stripped_prefix == "_orig_mod."
    assert_same(report.output, state)
    result = convert(str(tmp_path / "c.pt"), "--key", "ema", "-o", str(tmp_path / "ema.safetensors"))
    assert result.exit_code == 0, result.output
    assert_same(tmp_path / "ema.safetensors", ema)
    result = convert(str(tmp_path / "c.pt"), "--key", "model/nope", "-o", str(tmp_path / "x.safetensors"))
    assert (
        result.exit_code == 1
        and "no entry 'nope' at model" in result.stderr
        and "state_dict" in result.stderr
    )


def test_shared_storage_tied_weights_and_views(tmp_path):
    base = torch.randn(4, 6)
    state = {"embed.weight": base, "head.weight": base, "half": base[:2], "transposed": base.t()}
    torch.save(state, tmp_path / "tied.pt")
    result = convert(str(tmp_path / "tied.pt"))
    assert result.exit_code == 0, result.output
    assert_same(tmp_path / "tied.safetensors", {k: v.contiguous() for k, v in state.items()})


def test_pickled_objects_are_refused_with_a_clear_error(tmp_path):
    torch.save({"state_dict": small_state(), "config": Thing()}, tmp_path / "obj.pt")
    result = convert(str(tmp_path / "obj.pt"))
    assert result.exit_code == 1
    assert "holds objects other than tensors" in result.stderr and "Thing" in result.stderr
    assert "model.state_dict()" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "obj.safetensors").exists()


def test_non_tensor_values_name_the_entry(tmp_path):
    torch.save({"w": torch.ones(2), "step": 5}, tmp_path / "mixed.pt")
    result = convert(str(tmp_path / "mixed.pt"))
    assert result.exit_code == 1
    assert "entry 'step' is a int, not a tensor" in result.stderr and "--key" in result.stderr
    torch.save({"state_dict": {"w": torch.ones(2), "nested": {"b": torch.ones(1)}}}, tmp_path / "nest.pt")
    result = convert(str(tmp_path / "nest.pt"))
    assert result.exit_code == 1 and "entry 'state_dict/nested' is a dict" in result.stderr
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    result = convert(str(tmp_path / "list.pt"))
    assert result.exit_code == 1 and "expected a state dict" in result.stderr and "list" in result.stderr


def test_unreadable_missing_and_existing_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    result = convert(str(tmp_path / "junk.pt"))
    assert result.exit_code == 1 and "not a readable PyTorch checkpoint" in result.stderr
    result = convert(str(tmp_path / "absent.pt"))
    assert result.exit_code == 1 and "no such file" in result.stderr
    torch.save(small_state(), tmp_path / "m.pt")
    (tmp_path / "m.safetensors").write_bytes(b"keep me")
    result = convert(str(tmp_path / "m.pt"))
    assert result.exit_code == 1 and "--force" in result.stderr
    assert (tmp_path / "m.safetensors").read_bytes() == b"keep me"
    assert convert(str(tmp_path / "m.pt"), "--force").exit_code == 0
    assert_same(tmp_path / "m.safetensors", small_state())


def test_without_torch_the_message_says_to_install_it(tmp_path, monkeypatch):
    torch.save(small_state(), tmp_path / "m.pt")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ConversionError, match="pip install torch"):
        convert_checkpoint(tmp_path / "m.pt")

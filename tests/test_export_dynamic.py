"""Dynamic ONNX by default (issue 10.2): a default `export` runs in ONNX Runtime at other batch sizes and
sequence lengths than its example inputs, proven here with our own ONNX Runtime sessions."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from normsurgeon import zoo
from normsurgeon.cli import main
from normsurgeon.onnx import export_onnx
from normsurgeon.outputs import flatten_outputs


def _run_both(model, path, feeds: dict[str, np.ndarray]) -> float:
    """Max abs difference between ONNX Runtime and PyTorch on ``feeds``."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = sess.run(None, feeds)
    with torch.no_grad():
        expected = flatten_outputs(model(**{k: torch.from_numpy(v) for k, v in feeds.items()}))
    assert len(actual) <= len(expected)
    return max(float(np.abs(a - e.numpy()).max()) for a, e in zip(actual, expected) if a.shape == tuple(e.shape))


def _cli_export(model_dir, out) -> dict:
    result = CliRunner().invoke(main, ["export", str(model_dir), "-o", str(out), "--json", "--random-inputs", "1"])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_default_export_of_a_transformers_dir_runs_at_batch_1_and_8_and_two_lengths(tmp_path, name):
    model = zoo.MODELS[name]()
    model.save_pretrained(tmp_path / name)
    data = _cli_export(tmp_path / name, tmp_path / "m.onnx")
    assert data["dynamic"] == {"input_ids": {"0": "batch", "1": "sequence"}}, data
    assert data["inputs"][0]["shape"] == ["batch", "sequence"] and data["static_reason"] is None
    # the config's example is (2, 16); sequences are verified within max positions (32)
    assert data["dynamic_sizes_verified"] == {"batch": [1, 8], "sequence": [8, 32]}
    checked = {c["name"]: c["shapes"]["input_ids"] for c in data["verify"]["checks"]}
    assert checked["batch=1 sequence=8"] == [1, 8] and checked["batch=8 sequence=32"] == [8, 32]
    gen = torch.Generator().manual_seed(3)
    for batch in (1, 8):
        for seq in (5, 32):
            ids = torch.randint(0, 100, (batch, seq), generator=gen).numpy()
            assert _run_both(model, tmp_path / "m.onnx", {"input_ids": ids}) < 1e-4, (batch, seq)


def test_default_export_of_a_vit_runs_at_batch_1_and_8(tmp_path):
    model = zoo.vit()
    model.save_pretrained(tmp_path / "vit")
    data = _cli_export(tmp_path / "vit", tmp_path / "v.onnx")
    assert data["dynamic"] == {"pixel_values": {"0": "batch"}}
    assert data["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    for batch in (1, 8):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)).numpy()
        assert _run_both(model, tmp_path / "v.onnx", {"pixel_values": x}) < 1e-4, batch


def test_static_keeps_the_example_shapes(tmp_path):
    model = zoo.vit()
    result = CliRunner().invoke(main, ["export", "normsurgeon.zoo:vit", "-o", str(tmp_path / "s.onnx"), "--static",
                                       "--json", "--random-inputs", "0"])
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads(result.stdout)
    assert data["dynamic"] == {} and data["inputs"][0]["shape"] == [2, 3, 32, 32]
    assert "--static" in data["static_reason"] and data["verify"]["inputs_checked"] == 1
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        sess.run(None, {"pixel_values": np.zeros((1, 3, 32, 32), np.float32)})
    x = model.example_inputs().kwargs["pixel_values"].numpy()
    assert _run_both(model, tmp_path / "s.onnx", {"pixel_values": x}) < 1e-4


class ExampleBatchBranch(torch.nn.Module):
    """Branches on its example batch size: eager runs any batch, torch.export cannot keep it dynamic."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x):
        if x.shape[0] == 2:
            return self.lin(x)
        return self.lin(x) + 1


def test_export_falls_back_to_static_with_a_note(tmp_path):
    torch.manual_seed(0)
    model = ExampleBatchBranch().eval()
    report = export_onnx(model, (torch.randn(2, 8),), tmp_path / "f.onnx", num_random=1)
    assert report.exporter == "dynamo" and report.verify.passed and report.written
    assert report.dynamic_axes == {} and report.inputs[0]["shape"] == [2, 8]
    assert "failed with dynamic dimensions" in report.static_reason
    assert "shape[0] to 2" in report.static_reason, report.static_reason
    assert any("static shapes" in n and "input_0 dim 0 (batch)" in n for n in report.notes), report.notes
    data = report.to_json()
    assert data["dynamic"] == {} and data["static_reason"] == report.static_reason
    # asked for a dynamic batch explicitly: an error, not a silent static file
    with pytest.raises(Exception, match="dynamo"):
        export_onnx(model, (torch.randn(2, 8),), tmp_path / "g.onnx", dynamic_batch=True, exporter="dynamo")
    assert not (tmp_path / "g.onnx").exists()


class FixedBatch(torch.nn.Module):
    """Reshapes to its example batch size: the PyTorch model itself refuses any other batch."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(x.reshape(2, 8))


def test_a_dimension_the_model_rejects_stays_static(tmp_path):
    torch.manual_seed(0)
    model = FixedBatch().eval()
    report = export_onnx(model, (torch.randn(2, 8),), tmp_path / "f.onnx", num_random=0)
    assert report.verify.passed and report.dynamic_axes == {} and report.inputs[0]["shape"] == [2, 8]
    assert report.static_reason.startswith("batch kept static: the PyTorch model rejects other sizes (batch=1:")
    assert report.static_reason in report.notes


class SingleSampleBranch(torch.nn.Module):
    """Takes another path for a batch of one: torch.export keeps the batch dynamic (guarding it >= 2),
    and the file computes the wrong function at batch 1, which verification at batch 1 finds."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x):
        if x.shape[0] > 1:
            return self.lin(x)
        return self.lin(x) * 2


def test_export_wrong_at_other_sizes_falls_back_to_static(tmp_path):
    torch.manual_seed(0)
    model = SingleSampleBranch().eval()
    x = (torch.randn(2, 8),)
    # required dynamic: the dynamic file is kept as it is and its verification fails at batch 1 (only)
    strict = export_onnx(model, x, tmp_path / "d.onnx", num_random=1, dynamic_batch=True, keep_failed=True)
    assert strict.dynamic_axes == {"input_0": {0: "batch"}} and not strict.verify.passed
    assert [c.name for c in strict.verify.checks if not c.passed] == ["batch=1"]
    # default: exported again with static shapes, and the report says why
    report = export_onnx(model, x, tmp_path / "s.onnx", num_random=1)
    assert report.verify.passed and report.written and report.dynamic_axes == {}
    assert report.inputs[0]["shape"] == [2, 8]
    assert report.static_reason.startswith("the dynamic export disagrees with PyTorch at other sizes (batch=1")
    assert "static shapes" in report.notes[0]


def test_dynamic_shapes_show_in_the_rendered_table():
    """Table cells are data, not rich markup: "[batch, 3, 32, 32]" used to vanish as a markup tag."""
    import io

    from rich.console import Console

    from normsurgeon.cli.common import render_table
    from normsurgeon.report import Table

    buf = io.StringIO()
    render_table(Table("ONNX export", ["item", "value"], [["input pixel_values", "float [batch, 3, 32, 32]"]]),
                 Console(file=buf, width=120))
    assert "float [batch, 3, 32, 32]" in buf.getvalue()


def test_every_token_input_gets_the_same_batch_and_sequence(tmp_path):
    from normsurgeon.inputs import CallArgs

    model = zoo.bert()
    ids = model.example_inputs().kwargs["input_ids"]
    ci = CallArgs((), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)})
    report = export_onnx(model, ci, tmp_path / "b.onnx", num_random=0)
    assert report.dynamic_axes == {n: {0: "batch", 1: "sequence"} for n in ci.kwargs}
    assert all(i["shape"] == ["batch", "sequence"] for i in report.inputs)
    assert report.verify.passed and report.verify.checks[-1].shapes == {n: [8, 24] for n in ci.kwargs}
    assert not any("shape constraints" in n for n in report.notes), report.notes
    mask = np.ones((1, 7), np.int64)
    mask[0, 5:] = 0  # padding, as a tokenizer would give
    feeds = {"input_ids": np.arange(7, dtype=np.int64)[None], "attention_mask": mask,
             "token_type_ids": np.zeros((1, 7), np.int64)}
    assert _run_both(model, tmp_path / "b.onnx", feeds) < 1e-4

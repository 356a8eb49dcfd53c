"""Latency measurement in ONNX Runtime: interleaving, statistics, signatures, CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from normsurgeon import bench as bench_mod
from normsurgeon import zoo
from normsurgeon.bench import measure_latency
from normsurgeon.cli import main
from normsurgeon.errors import NormSurgeonError
from normsurgeon.onnx import export_onnx


def _save(path, nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _image_in(batch=2):
    return [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8, 16, 16])]


def _image_out(batch=2):
    return [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, 16, 16])]


@pytest.fixture()
def graphs(tmp_path):
    rng = np.random.default_rng(0)
    stats = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             (("s", rng.random(8) + 0.5), ("b", rng.standard_normal(8)), ("m", rng.standard_normal(8)),
              ("v", rng.random(8) + 0.5))]
    bn = _save(tmp_path / "bn.onnx", [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["t"]),
                                     helper.make_node("Relu", ["t"], ["y"])], _image_in(), _image_out(), stats)
    plain = _save(tmp_path / "plain.onnx", [helper.make_node("Relu", ["x"], ["y"])], _image_in(), _image_out())
    ids = _save(tmp_path / "ids.onnx", [helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)],
                [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 12])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])])
    dyn = _save(tmp_path / "dyn.onnx", [helper.make_node("Relu", ["x"], ["y"])], _image_in("batch"),
                _image_out("batch"))
    return {"bn": bn, "plain": plain, "ids": ids, "dyn": dyn}


def test_measure_latency_statistics_and_ratios(graphs):
    report = measure_latency([graphs["bn"], graphs["plain"]], runs=12, warmup=2)
    first, second = report.models
    assert len(first.times_ms) == len(second.times_ms) == 12
    assert first.ratio == 1.0
    assert second.ratio == pytest.approx(second.median_ms / first.median_ms)
    assert first.p10_ms <= first.median_ms <= first.p90_ms
    assert first.norm_ops == {"BatchNormalization": 1} and second.norm_ops == {}
    assert second.vs_first["max_abs_error"] > 0.01  # the BN changes the outputs
    data = report.to_json()
    assert data["inputs"] == {"x": {"shape": [2, 8, 16, 16], "dtype": "float32"}}
    assert [m["ratio"] for m in data["models"]][0] == 1.0
    assert {"median_ms", "p10_ms", "p90_ms", "iqr_ms", "ratio", "runs"} <= set(data["models"][1])
    json.dumps(data)
    (table,) = report.tables()
    assert len(table.rows) == 2


def test_runs_are_interleaved_round_robin(graphs, monkeypatch):
    calls = []
    real = bench_mod.make_session

    class Recording:
        def __init__(self, path, **kw):
            self.path, self.sess = str(path), real(path, **kw)

        def get_inputs(self):
            return self.sess.get_inputs()

        def run(self, *a):
            calls.append(self.path)
            return self.sess.run(*a)

    monkeypatch.setattr(bench_mod, "make_session", lambda p, **kw: Recording(p, **kw))
    paths = [str(graphs["bn"]), str(graphs["plain"]), str(graphs["dyn"])]
    measure_latency(paths, runs=3, warmup=1, dims={"batch": 2})
    timed = calls[-9:]  # after one output check and one warm-up round per model
    assert timed == [paths[0], paths[1], paths[2], paths[1], paths[2], paths[0], paths[2], paths[0], paths[1]]


def test_signature_mismatch_is_a_clear_error(graphs):
    with pytest.raises(NormSurgeonError, match="take different inputs"):
        measure_latency([graphs["bn"], graphs["ids"]], runs=1, warmup=0)


def test_dynamic_dims(graphs):
    assert measure_latency([graphs["dyn"]], runs=1, warmup=0).inputs["x"]["shape"] == [1, 8, 16, 16]
    assert measure_latency([graphs["dyn"]], runs=1, warmup=0, dims={"batch": 3}).inputs["x"]["shape"] == [3, 8, 16, 16]
    # a static model fixes the dynamic one's size
    report = measure_latency([graphs["dyn"], graphs["plain"]], runs=1, warmup=0)
    assert report.inputs["x"]["shape"] == [2, 8, 16, 16]


def test_given_inputs(graphs):
    x = np.random.default_rng(1).standard_normal((2, 8, 16, 16))  # float64: cast to the model's float32
    report = measure_latency([graphs["plain"]], inputs={"x": x}, runs=1, warmup=0)
    assert report.inputs["x"]["dtype"] == "float32"
    with pytest.raises(NormSurgeonError, match="named"):
        measure_latency([graphs["plain"]], inputs={"pixel_values": x}, runs=1, warmup=0)
    with pytest.raises(NormSurgeonError, match="shape"):
        measure_latency([graphs["plain"]], inputs={"x": x[:, :4]}, runs=1, warmup=0)


def test_cli_bench_two_real_models(tmp_path):
    model = zoo.resnet()
    a, b = tmp_path / "dynamo.onnx", tmp_path / "torchscript.onnx"
    export_onnx(model, model.example_inputs(), a, verify=False, exporter="dynamo")
    export_onnx(model, model.example_inputs(), b, verify=False, exporter="torchscript")
    result = CliRunner().invoke(main, ["bench", str(a), str(b), "--runs", "10", "--warmup", "2", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads(result.stdout)
    assert [m["onnx"] for m in data["models"]] == [str(a), str(b)]
    assert data["models"][0]["ratio"] == 1.0 and data["models"][1]["ratio"] > 0
    assert data["models"][1]["vs_first"]["max_abs_error"] < 1e-4  # same model, two exporters
    assert data["threads"] == 1 and data["threads_default"] is True and data["runs"] == 10
    second = data["models"][1]
    assert second["paired_p10"] <= second["paired_ratio"] <= second["paired_p90"]
    assert isinstance(second["within_noise"], bool) and data["models"][0]["within_noise"] is None
    table = CliRunner().invoke(main, ["bench", str(a), str(b), "--runs", "3", "--warmup", "0"])
    assert table.exit_code == 0 and "ratio vs first" in table.stdout
    assert "1 thread (default; --threads N to change)" in table.stdout
    given = json.loads(CliRunner().invoke(main, ["bench", str(a), "--runs", "2", "--threads", "2", "--json"]).stdout)
    assert given["threads"] == 2 and given["threads_default"] is False


def test_paired_ratios_come_from_the_same_rounds(graphs):
    report = measure_latency([graphs["bn"], graphs["plain"], graphs["dyn"]], runs=15, warmup=1, dims={"batch": 2})
    first = report.models[0]
    assert first.paired_ratios == [1.0] * 15 and first.within_noise is None
    for m in report.models[1:]:
        assert len(m.paired_ratios) == 15
        assert m.paired_ratios == [t / f for t, f in zip(m.times_ms, first.times_ms)]
        assert m.paired_ratio == pytest.approx(float(np.median(m.paired_ratios)))
        assert m.paired_p10 == pytest.approx(float(np.percentile(m.paired_ratios, 10)))
        assert m.paired_p90 == pytest.approx(float(np.percentile(m.paired_ratios, 90)))
        q25, q75 = np.percentile(m.paired_ratios, [25, 75])
        assert m.paired_iqr == pytest.approx(float(q75 - q25))
        data = next(d for d in report.to_json()["models"] if d["onnx"] == m.onnx)
        assert data["paired_ratio"] == pytest.approx(m.paired_ratio, abs=1e-4)
        assert data["paired_p10"] == pytest.approx(m.paired_p10, abs=1e-4)
        assert data["paired_p90"] == pytest.approx(m.paired_p90, abs=1e-4)
        assert data["within_noise"] == (m.paired_p10 <= 1.0 <= m.paired_p90)


def test_a_model_against_itself_is_reported_as_within_noise(graphs, tmp_path):
    # the same file twice: rotation puts each copy first in half of the rounds, so whatever order
    # effect or load there is, the paired ratios straddle 1.0 (no timing assumption)
    copy = tmp_path / "copy_of_bn.onnx"
    copy.write_bytes(graphs["bn"].read_bytes())
    report = measure_latency([graphs["bn"], copy], runs=40, warmup=2)
    assert report.models[1].within_noise is True
    assert any("cannot tell apart from the first model: copy_of_bn.onnx." in n for n in report.notes)
    assert "spread is wider than the difference" in " ".join(report.to_json()["notes"])
    (table,) = report.tables()
    assert "within noise" in table.rows[1][5]
    assert any("cannot tell apart" in n for n in table.notes)
    # and from the CLI
    result = CliRunner().invoke(main, ["bench", str(graphs["bn"]), str(copy), "--runs", "40", "--json"])
    data = json.loads(result.stdout)
    assert data["models"][1]["within_noise"] is True and "cannot tell apart" in data["notes"][0]


def test_within_noise_rule_and_thread_note():
    # the rule itself, on given ratios (not timings): a difference outside the spread is not flagged
    clear = bench_mod.ModelTiming("b.onnx", times_ms=[1.0] * 5, paired_ratios=[0.80, 0.82, 0.85, 0.86, 0.9])
    noisy = bench_mod.ModelTiming("c.onnx", times_ms=[1.0] * 5, paired_ratios=[0.8, 0.9, 0.95, 1.05, 1.2])
    first = bench_mod.ModelTiming("a.onnx", times_ms=[1.0] * 5, paired_ratios=[1.0] * 5, is_first=True)
    assert (clear.within_noise, noisy.within_noise, first.within_noise) == (False, True, None)
    report = bench_mod.BenchReport([first, clear, noisy], {}, threads=1, warmup=0, runs=5, seed=0, cpus=2)
    assert report.notes == [report.notes[0]] and "c.onnx" in report.notes[0] and "b.onnx" not in report.notes[0]
    (table,) = report.tables()
    assert "within noise" not in table.rows[1][5] and "within noise" in table.rows[2][5]
    crowded = bench_mod.BenchReport([first], {}, threads=2, warmup=0, runs=5, seed=0, cpus=2)
    assert any("2 threads on 2 available CPUs" in n for n in crowded.notes)
    assert not bench_mod.BenchReport([first], {}, threads=2, warmup=0, runs=5, seed=0, cpus=8).notes


def test_cli_bench_bad_input(graphs, tmp_path):
    for args in ([str(graphs["bn"]), str(graphs["ids"])], [str(tmp_path / "missing.onnx")],
                 [str(graphs["bn"]), "--dim", "batch"]):
        result = CliRunner().invoke(main, ["bench", *args, "--runs", "1"])
        assert result.exit_code == 2, result.output
        err = result.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    (tmp_path / "junk.onnx").write_text("junk")
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "junk.onnx")])
    assert result.exit_code == 2 and "ONNX Runtime cannot load" in result.stderr

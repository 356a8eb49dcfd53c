"""Export any model to ONNX and prove it in ONNX Runtime, with dynamic batch and sequence axes.

    python examples/export_and_verify.py [--outdir DIR]

Exports a BERT encoder (token inputs, dynamic batch + sequence) and a ConvNeXt (channels-first
LayerNorms), verifies each in ONNX Runtime on several random inputs and at a second batch/sequence
size, and prints the normalization ops the ONNX graph holds before and after ORT's optimizations.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import normsurgeon
from normsurgeon import zoo



def _ops(counts: dict | None) -> str:
    """Norm-op counts as a reader wants them: 'BatchNormalization 23', or 'none'."""
    return ", ".join(f"{k} {v}" for k, v in (counts or {}).items() if v) or "none"

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", default=None)
    args = parser.parse_args(argv)
    outdir = Path(args.outdir or tempfile.mkdtemp(prefix="export-example-"))
    outdir.mkdir(parents=True, exist_ok=True)

    for name, dynamic in (("bert", dict(dynamic_batch=True, dynamic_seq=True)), ("convnext", dict(dynamic_batch=True))):
        model = zoo.MODELS[name]()
        report = normsurgeon.export_onnx(model, model.example_inputs(), outdir / f"{name}.onnx", force=True, **dynamic)
        data = report.to_json()
        verify = data["verify"]
        print(f"{name}: {data['onnx']} via {data['exporter']}")
        print(f"   verified: {verify['passed']} on {verify.get('inputs_checked')} inputs, "
              f"max abs {verify['max_abs_error']:.2e}, max rel {verify['max_rel_error']:.2e}")
        print(f"   norm ops exported: {_ops(data['norm_ops'])}; after ORT optimization: "
              f"{_ops(data.get('norm_ops_optimized'))}")
        assert verify["passed"]


if __name__ == "__main__":
    main()

"""Fold BatchNorm before deployment: a CNN and a BN-transformer (LeViT), verified and timed in ONNX Runtime.

    python examples/fold_before_deploy.py [--outdir DIR] [--runs 100]

For each model: fold every foldable BN into its neighbouring Conv/Linear (normsurgeon.fold checks the
outputs and rolls back any site that would change them), export original and folded models to ONNX,
verify both in ONNX Runtime, count the BatchNormalization ops left, and time them side by side.
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
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args(argv)
    outdir = Path(args.outdir or tempfile.mkdtemp(prefix="fold-example-"))
    outdir.mkdir(parents=True, exist_ok=True)

    for name in ("resnet", "levit"):
        model = zoo.MODELS[name]()
        inputs = model.example_inputs()
        folded, report = normsurgeon.fold(model, inputs)
        summary = report.to_json()
        print(f"\n== {name}: folded {len(summary['folded'])} BatchNorms, skipped {len(summary['skipped'])}; "
              f"max abs error {summary['verify']['max_abs_error']:.2e}")
        for skip in summary["skipped"]:
            print(f"   kept {skip['norm']}: {skip['reason']}")

        paths = []
        for tag, m in (("original", model), ("folded", folded)):
            path = outdir / f"{name}_{tag}.onnx"
            exported = normsurgeon.export_onnx(m, inputs, path, force=True).to_json()
            print(f"   {tag:8s} ONNX: {_ops(exported['norm_ops'])}  verified in ONNX Runtime: "
                  f"{exported['verify']['passed']} (max abs error {exported['verify']['max_abs_error']:.2e})")
            assert exported["verify"]["passed"], f"{tag} {name} does not match torch in ONNX Runtime"
            paths.append(path)
        bench = normsurgeon.measure_latency(paths, threads=2, runs=args.runs).to_json()
        for row in bench["models"]:
            print(f"   {Path(row['onnx']).name:24s} median {row['median_ms']:.3f} ms  ratio {row['ratio']:.2f}")


if __name__ == "__main__":
    main()

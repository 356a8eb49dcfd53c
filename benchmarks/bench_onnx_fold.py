"""What `normsurgeon fold model.onnx` buys in ONNX Runtime, on LeViT's ONNX as torch exports it.

A LeViT (LeViT-128S sized, 224x224, random weights, randomized BN statistics; ``--small``: the tiny
zoo LeViT at 64x64) is exported with torch's exporters, BatchNormalization kept (TorchScript with
``training=PRESERVE``; the dynamo exporter as a user calls it, which may fold some BNs itself), then
folded *as an .onnx file* (``normsurgeon.fold``: no PyTorch model involved). Each pair is timed in
ONNX Runtime (CPU, 1 intra-op thread, the two models interleaved round by round; ``normsurgeon.bench``)
and reported as the paired ratio folded / exported with its p10–p90 spread over rounds. The machine's
load average is printed before and after: on a shared machine, read the spread before the ratio.

    python benchmarks/bench_onnx_fold.py                 # LeViT-128S, both exporters
    python benchmarks/bench_onnx_fold.py --small --runs 50
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from normsurgeon import api, zoo  # noqa: E402
from normsurgeon.bench import measure_latency  # noqa: E402
from normsurgeon.onnx import optimized_norm_ops  # noqa: E402


def levit(small: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    if small:
        m = zoo.levit()
        return m, m.example_inputs().kwargs["pixel_values"][:1]
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LevitConfig(image_size=224, hidden_sizes=[128, 256, 384], num_attention_heads=[4, 6, 8],
                                   depths=[2, 3, 4], key_dim=[16, 16, 16], drop_path_rate=0, mlp_ratio=[2, 2, 2],
                                   attention_ratio=[2, 2, 2], num_labels=1000)
    m = transformers.LevitForImageClassification(cfg).eval()
    zoo._randomize_norm_stats(m)
    return m, torch.randn(1, 3, 224, 224)


class Logits(torch.nn.Module):
    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.m(pixel_values=pixel_values).logits


def export(model: torch.nn.Module, x: torch.Tensor, path: Path, exporter: str) -> None:
    w = Logits(model).eval()
    if exporter == "torchscript":
        torch.onnx.export(w, (x,), str(path), dynamo=False, opset_version=17, input_names=["pixel_values"],
                          output_names=["logits"], training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=False, dynamic_axes={"pixel_values": {0: "batch"}})
    else:
        torch.onnx.export(w, (x,), str(path), dynamo=True, verbose=False, input_names=["pixel_values"],
                          output_names=["logits"], dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}})


def bns(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path), load_external_data=False).graph.node)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="the tiny zoo LeViT (64x64) instead of LeViT-128S")
    ap.add_argument("--exporter", choices=["both", "torchscript", "dynamo"], default="both")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    load_before = os.getloadavg()
    model, x = levit(args.small)
    results = []
    exporters = ["torchscript", "dynamo"] if args.exporter == "both" else [args.exporter]
    with tempfile.TemporaryDirectory() as tmp:
        for exporter in exporters:
            src, dst = Path(tmp) / f"levit_{exporter}.onnx", Path(tmp) / f"levit_{exporter}_folded.onnx"
            export(model, x, src, exporter)
            t0 = time.perf_counter()
            _, report = api.fold(src, output=dst)
            fold_s = time.perf_counter() - t0
            bench = measure_latency([src, dst], threads=1, runs=args.runs, warmup=args.warmup)
            first, folded = bench.models
            row = {"exporter": exporter, "bn_exported": bns(src), "bn_folded_file": bns(dst),
                   "bn_after_ort_exported": optimized_norm_ops(src).get("BatchNormalization", 0),
                   "bn_after_ort_folded": optimized_norm_ops(dst).get("BatchNormalization", 0),
                   "fold": report.summary(), "fold_seconds": round(fold_s, 2),
                   "exported_ms": round(first.median_ms, 3), "folded_ms": round(folded.median_ms, 3),
                   "paired_ratio": round(folded.paired_ratio, 4),
                   "paired_p10_p90": [round(folded.paired_p10, 4), round(folded.paired_p90, 4)],
                   "within_noise": folded.within_noise}
            results.append(row)
            print(json.dumps(row), flush=True)
    load_after = os.getloadavg()
    summary = {"model": "levit (zoo, 64x64)" if args.small else "LeViT-128S 224x224", "threads": 1,
               "runs": args.runs, "load_average_before": [round(v, 2) for v in load_before],
               "load_average_after": [round(v, 2) for v in load_after], "cpus": os.cpu_count(), "results": results}
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

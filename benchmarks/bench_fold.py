"""What folding BatchNorms buys in ONNX Runtime, and how much of it other tools get.

One run, three ONNX files of the same LeViT (levit-128S sized, 224x224, random weights, randomized BN
statistics), timed interleaved in ONNX Runtime (CPU, 1 thread by default, median of many runs):

- exported:  the model as the torch ONNX exporter (dynamo) produces it; the exporter and ORT already
             fold Conv→BN and Gemm→BN themselves, so this is the baseline a user gets for free;
- folded:    ``normsurgeon.fold`` first, then the same export;
- no BN:     every BN replaced by Identity, the limit no fold can beat (its outputs differ, of course);
- no BN + bias: the same, but every Linear/Conv keeps the bias the fold gave it: the best an *exact* fold
             can do, since a BN's shift must end up in some bias (LeViT's Linears have none of their own,
             and ONNX Runtime runs a 3-D Linear with a bias as Reshape → Gemm → Reshape).

Ratios against the limit are given two ways: ratio of medians, and "paired" (the median over rounds of
each round's time ratio; a round runs every model back to back, so bursts of load from other processes
hit both sides of a paired ratio and cancel out). Each paired ratio comes with its spread over rounds
(p10–p90); when that interval contains 1.0 the difference is smaller than the round-to-round noise and
the row says "within noise". One ONNX Runtime thread by default: on a 2-vCPU machine two threads made
LeViT-128S both slower (17–22 ms vs 10 ms) and unstable (paired ratios 0.75–1.33 vs ±2%).

It also counts how many BNs ``torch.fx.experimental.optimization.fuse`` (the torch utility that folds
Conv/Linear→BN) removes from the same models, and how many normsurgeon folds.

    python benchmarks/bench_fold.py            # or: make bench
    python benchmarks/bench_fold.py --runs 300 --json results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from normsurgeon import zoo  # noqa: E402
from normsurgeon.passes.fold import fold  # noqa: E402
from normsurgeon.inputs import CallArgs  # noqa: E402

_BN = nn.modules.batchnorm._BatchNorm
FX_MODELS = ["levit", "resnet", "mobilenet_v2", "efficientnet", "regnet", "mobilevit"]


def levit_128s() -> nn.Module:
    """LeViT-128S sized (hidden 128/256/384, depths 2/3/4), 224x224 input, random weights."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LevitConfig(image_size=224, hidden_sizes=[128, 256, 384], num_attention_heads=[4, 6, 8],
                                   depths=[2, 3, 4], key_dim=[16, 16, 16], drop_path_rate=0, mlp_ratio=[2, 2, 2],
                                   attention_ratio=[2, 2, 2], num_labels=1000)
    model = transformers.LevitForImageClassification(cfg).eval()
    zoo._randomize_norm_stats(model)
    return model


def without_bn(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for path, m in list(model.named_modules()):
        if isinstance(m, _BN):
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, nn.Identity())
    return model


def with_biases_of(model: nn.Module, folded: nn.Module) -> nn.Module:
    """``model`` with a (random) bias wherever the fold created one."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    for path, m in model.named_modules():
        other = folded.get_submodule(path)
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.bias is None and other.bias is not None:
            m.bias = nn.Parameter(torch.randn(other.bias.shape, generator=g).to(other.bias.dtype))
    return model


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, _BN) for m in model.modules())


def fx_fuse(model: nn.Module) -> str:
    """BNs torch.fx.experimental.optimization.fuse removes, or why it cannot."""
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(copy.deepcopy(model))
    except Exception as e:  # noqa: BLE001
        return f"trace fails ({type(e).__name__})"
    return f"{count_bn(model) - count_bn(fused)} of {count_bn(model)}"


# --- ONNX: the project's helpers when present, torch.onnx + onnxruntime otherwise ---------------------

def export(model: nn.Module, ci: CallArgs, path: Path) -> None:
    try:
        from normsurgeon.onnx import export_onnx
    except ImportError:
        export_onnx = None
    if export_onnx is not None:
        export_onnx(model, ci, path, verify=False, force=True)
        return
    torch.onnx.export(model, ci.args, str(path), kwargs=ci.kwargs, dynamo=True, input_names=list(ci.kwargs) or None)


def bn_ops(path: Path) -> tuple[int, int]:
    """BatchNormalization ops in the exported file, and in the graph ONNX Runtime actually runs."""
    try:
        from normsurgeon.onnx import count_norm_ops, optimized_norm_ops
        return (count_norm_ops(path).get("BatchNormalization", 0),
                optimized_norm_ops(path).get("BatchNormalization", 0))
    except ImportError:
        import onnx
        import onnxruntime as ort

        n = sum(node.op_type == "BatchNormalization" for node in onnx.load(str(path)).graph.node)
        with tempfile.TemporaryDirectory() as tmp:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            m = sum(node.op_type == "BatchNormalization" for node in onnx.load(so.optimized_model_filepath).graph.node)
        return n, m


def latency(paths: list[Path], ci: CallArgs, runs: int, warmup: int, threads: int) -> list[dict]:
    feeds = {k: v.numpy() for k, v in ci.kwargs.items()}
    try:
        from normsurgeon.bench import measure_latency
    except ImportError:
        measure_latency = None
    if measure_latency is not None:
        rep = measure_latency([str(p) for p in paths], inputs=feeds, threads=threads, warmup=warmup, runs=runs)
        return [{"median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms, "times": t.times_ms}
                for t in rep.models]
    import numpy as np
    import onnxruntime as ort

    sessions = []
    for p in paths:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        sessions.append(ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]))
    names = [s.get_inputs()[0].name for s in sessions]
    arr = next(iter(feeds.values()))
    times = [[] for _ in paths]
    for r in range(warmup + runs):
        for k in range(len(paths)):
            j = (r + k) % len(paths)
            t0 = time.perf_counter()
            sessions[j].run(None, {names[j]: arr})
            if r >= warmup:
                times[j].append((time.perf_counter() - t0) * 1e3)
    return [{"median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
             "p90_ms": float(np.percentile(t, 90)), "times": t} for t in times]


def paired_spread(times: list[float], ref: list[float]) -> tuple[float, float, float]:
    """(median, p10, p90) over rounds of time / reference time in the same round."""
    import numpy as np

    r = np.asarray(times) / np.asarray(ref)
    return float(np.median(r)), float(np.percentile(r, 10)), float(np.percentile(r, 90))


def fmt_paired(times: list[float], ref: list[float]) -> str:
    """'0.994x (0.970–1.020) within noise': the paired ratio, its spread, and whether 1.0 is inside it."""
    med, lo, hi = paired_spread(times, ref)
    if times is ref:
        return f"{med:.3f}x"
    return f"{med:.3f}x ({lo:.3f}–{hi:.3f})" + (" within noise" if lo <= 1.0 <= hi else "")


def ort_error(path: Path, model: nn.Module, ci: CallArgs) -> float:
    """Max relative error of an ONNX file against the original torch model."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: next(iter(ci.kwargs.values())).numpy()})[0]
    with torch.no_grad():
        want = model(**ci.kwargs).logits
    return float((want - torch.from_numpy(got)).abs().max() / want.abs().max())


def table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def bench_one(name: str, model: nn.Module, ci: CallArgs, args, runs: int) -> tuple[list[dict], dict]:
    folded, rep = fold(model, ci)
    no_bn = without_bn(model)
    variants = [("exported (torch dynamo exporter)", model), ("normsurgeon folded", folded),
                ("BNs deleted (limit)", no_bn), ("BNs deleted + the fold's biases", with_biases_of(no_bn, folded))]
    with tempfile.TemporaryDirectory(prefix="bench-fold-") as tmp:
        paths = []
        for i, (label, m) in enumerate(variants):
            p = Path(tmp) / f"v{i}.onnx"
            print(f"{name}: exporting {label} ...", file=sys.stderr)
            export(m, ci, p)
            paths.append(p)
        counts = [bn_ops(p) for p in paths]
        errors = [ort_error(p, model, ci) for p in paths]
        print(f"{name}: timing {len(paths)} models x {runs} interleaved runs ...", file=sys.stderr)
        times = latency(paths, ci, runs, args.warmup, args.threads)
    limit = times[2]["median_ms"]
    rows, out = [], []
    for (label, _), (n, n_opt), t, err in zip(variants, counts, times, errors):
        paired, p10, p90 = paired_spread(t["times"], times[2]["times"])
        rows.append([label, n, n_opt, f"{t['median_ms']:.3f}", f"{t['p10_ms']:.3f}–{t['p90_ms']:.3f}",
                     f"{t['median_ms'] / limit:.3f}x", fmt_paired(t["times"], times[2]["times"]), f"{err:.1e}"])
        out.append({"model": label, "bn_ops": n, "bn_ops_ort": n_opt,
                    **{k: v for k, v in t.items() if k != "times"}, "vs_limit": t["median_ms"] / limit,
                    "vs_limit_paired": paired, "vs_limit_paired_p10": p10, "vs_limit_paired_p90": p90,
                    "within_noise": t is not times[2] and p10 <= 1.0 <= p90, "max_rel_error": err})
    shape = "x".join(map(str, next(iter(ci.kwargs.values())).shape))
    print(f"{name}, input {shape}, {count_bn(model)} BatchNorms (normsurgeon folded {len(rep.folded)}), "
          f"median of {runs} interleaved runs")
    print(table(rows, ["model", "BN ops in ONNX", "BN ops ORT runs", "median ms", "p10–p90 ms", "vs limit",
                       "vs limit, paired (p10–p90)", "max rel err vs torch"]))
    pairs = {"folded_vs_limit_paired": (1, 2), "exported_vs_folded_paired": (0, 1),
             "folded_vs_limit_with_biases_paired": (1, 3)}
    ratios = {"folded_vs_limit": times[1]["median_ms"] / limit, "exported_vs_limit": times[0]["median_ms"] / limit,
              "exported_vs_folded": times[0]["median_ms"] / times[1]["median_ms"]}
    for key, (a, b) in pairs.items():
        med, lo, hi = paired_spread(times[a]["times"], times[b]["times"])
        ratios.update({key: med, f"{key}_p10": lo, f"{key}_p90": hi})
    shown = {key: fmt_paired(times[a]["times"], times[b]["times"]) for key, (a, b) in pairs.items()}
    print(f"folded / limit = {ratios['folded_vs_limit']:.3f}x by medians, {shown['folded_vs_limit_paired']} "
          f"paired (target ≤ 1.02x); exported / folded = {ratios['exported_vs_folded']:.3f}x by medians, "
          f"{shown['exported_vs_folded_paired']} paired; folded / (limit + biases) = "
          f"{shown['folded_vs_limit_with_biases_paired']} paired")
    print("(p10–p90) = spread of the per-round ratios; 'within noise' = the interval contains 1.0, so the "
          "difference is smaller than the round-to-round noise\n")
    return out, ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="timed runs per model (interleaved)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="ONNX Runtime (and torch) threads; 1 gives stable ratios (see the docstring)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    results: dict = {"torch": torch.__version__}

    # 1. fold coverage: normsurgeon vs torch.fx fuse
    cover = []
    for name in FX_MODELS + ["levit_128s"]:
        model = levit_128s() if name == "levit_128s" else zoo.MODELS[name]()
        ci = model.example_inputs() if name != "levit_128s" else None
        if ci is None:
            ci = CallArgs((), {"pixel_values": torch.randn(args.batch, 3, 224, 224,
                                                           generator=torch.Generator().manual_seed(0))})
        _, rep = fold(model, ci)
        cover.append([name, count_bn(model), f"{len(rep.folded)} of {rep.num_norms}",
                      f"{rep.verify.max_rel_error:.1e}", fx_fuse(model)])
    results["coverage"] = [dict(zip(["model", "batchnorms", "normsurgeon", "max_rel_error", "fx_fuse"], r))
                           for r in cover]
    print(table(cover, ["model", "BNs", "normsurgeon folds", "max rel err", "torch.fx fuse folds"]))
    print()

    # 2. latency: LeViT-128S (the target) and the tiny test LeViT (where BN's share of the time is larger)
    import onnxruntime as ort
    results["latency"] = {}
    ratios = {}
    big_ci = CallArgs((), {"pixel_values": torch.randn(args.batch, 3, 224, 224,
                                                       generator=torch.Generator().manual_seed(0))})
    tiny = zoo.levit()
    for name, model, ci, runs in [("LeViT-128S", levit_128s(), big_ci, args.runs),
                                  ("zoo levit (tiny)", tiny, tiny.example_inputs(), 10 * args.runs)]:
        rows, ratios[name] = bench_one(name, model, ci, args, runs)
        results["latency"][name] = rows
    threads = f"{args.threads} thread{'s' if args.threads != 1 else ''}"
    print(f"ONNX Runtime {ort.__version__} CPU, {threads}, {args.warmup} warm-up runs per model; "
          f"[{time.time() - t_start:.0f} s]")
    results.update(ratios=ratios, onnxruntime=ort.__version__, threads=args.threads, runs=args.runs,
                   batch=args.batch)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

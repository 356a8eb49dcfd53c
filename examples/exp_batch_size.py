"""Batch-size sweep: BatchNorm vs LayerNorm vs GroupNorm vs frozen BatchNorm on scikit-learn's digits.

    python examples/exp_batch_size.py [--quick] [--outdir DIR] [--seeds 3] [--epochs 6] [--models cnn,mlp]

Data: the 1,797 8x8 handwritten digits bundled with scikit-learn (UCI optdigits), a fixed stratified
split of 1,437 train / 360 test images. Two models, because a BN's statistics come from batch x
positions values per channel:

- ``cnn``: 3 convs (16-32-32 channels, 8x8 -> 4x4 -> 2x2) + pooling + linear; at batch 2 its BNs
  still average over 128, 32 and 8 values per channel;
- ``mlp``: 64 -> 128 -> 128 -> 10 on the flattened image; at batch 2 its BNs see 2 values per channel.

Their norms are, per variant,

- ``bn``      BatchNorm (batch statistics in training, running statistics in eval);
- ``ln``      LayerNorm (cnn: ChannelLayerNorm, over the channels at each position, as ConvNeXt);
- ``gn``      GroupNorm with 4 groups;
- ``frozen``  BatchNorm whose statistics are measured once at initialization on 512 training images
              (``normsurgeon.calibrate``) and then frozen (``FrozenBatchNorm``): a fixed affine map,
              independent of the batch by construction.

Every run sees the same number of samples (``--epochs`` passes), Adam at lr 1e-3, so a batch of 2
takes 32x the steps of a batch of 64. Reported: test accuracy and loss in eval mode, mean ± std over
seeds (each seed changes the initialization and the sample order). Writes batch_size_MODEL.png,
batch_size.json and batch_size.md to --outdir.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import _exp_util as U

VARIANTS = ("bn", "ln", "gn", "frozen")


def load_digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=360, stratify=d.target, random_state=0)
    return x[tr], y[tr], x[te], y[te]


def make_norm(kind: str, c: int, arch: str) -> nn.Module:
    from normsurgeon.nn import ChannelLayerNorm
    if kind in ("bn", "frozen"):
        return nn.BatchNorm2d(c) if arch == "cnn" else nn.BatchNorm1d(c)
    if kind == "ln":
        return ChannelLayerNorm(c) if arch == "cnn" else nn.LayerNorm(c)
    return nn.GroupNorm(4, c)


def make_model(kind: str, arch: str) -> nn.Sequential:
    if arch == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 128), make_norm(kind, 128, arch), nn.ReLU(),
            nn.Linear(128, 128), make_norm(kind, 128, arch), nn.ReLU(), nn.Linear(128, 10))
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), make_norm(kind, 16, arch), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), make_norm(kind, 32, arch), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), make_norm(kind, 32, arch), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def freeze_bns(model: nn.Sequential, x_train: torch.Tensor) -> None:
    import normsurgeon
    from normsurgeon.nn import FrozenBatchNorm
    normsurgeon.calibrate(model, [x_train[i:i + 128] for i in range(0, 512, 128)])
    for i, m in enumerate(model):
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            model[i] = FrozenBatchNorm.from_batchnorm(m)


def run(arch: str, kind: str, batch_size: int, seed: int, data, epochs: int) -> dict:
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = make_model(kind, arch)
    if kind == "frozen":
        freeze_bns(model, x_tr)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(y_tr), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):  # drop the ragged last batch
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        logits = model(x_te)
    return {"model": arch, "variant": kind, "batch_size": batch_size, "seed": seed, "steps": steps, "train_s": seconds,
            "test_acc": (logits.argmax(-1) == y_te).float().mean().item(),
            "test_loss": F.cross_entropy(logits, y_te).item()}


def plot(results: list[dict], sizes: list[int], path: Path, arch: str) -> None:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind in VARIANTS:
        for ax, key in zip(axes, ("test_acc", "test_loss")):
            stats = [U.mean_std([r[key] for r in results
                                 if r["model"] == arch and r["variant"] == kind and r["batch_size"] == b])
                     for b in sizes]
            ax.errorbar(sizes, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=kind)
    for ax, title in zip(axes, ("test accuracy (eval mode)", "test cross-entropy (eval mode)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlabel("training batch size")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend()
    what = "3-conv CNN" if arch == "cnn" else "2-hidden-layer MLP"
    fig.suptitle(f"sklearn digits, {what}, same number of samples per run; mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds: 1 seed, batch 4 and 32, 1 epoch")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST_SEED ... FIRST_SEED + SEEDS - 1")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--models", default="cnn,mlp", help="comma-separated: cnn, mlp")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in OUTDIR/batch_size.runs.jsonl (each run is appended there)")
    parser.add_argument("--outdir", default=None)
    args = parser.parse_args(argv)
    U.require_extras()
    torch.set_num_threads(1)
    outdir = Path(args.outdir or tempfile.mkdtemp(prefix="exp-batch-size-"))
    outdir.mkdir(parents=True, exist_ok=True)
    sizes = [4, 32] if args.quick else [2, 4, 8, 16, 32, 64]
    seeds = range(args.first_seed, args.first_seed + (1 if args.quick else args.seeds))
    epochs = 1 if args.quick else args.epochs
    data = load_digits_split()
    archs = [a for a in args.models.split(",") if a]
    if not archs or set(archs) - {"cnn", "mlp"}:
        parser.error("--models takes cnn and/or mlp")
    log = outdir / "batch_size.runs.jsonl"
    done = {}
    if args.resume and log.is_file():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            if r.get("epochs") == epochs:
                done[(r["model"], r["seed"], r["batch_size"], r["variant"])] = r
    elif log.exists():
        log.unlink()
    results = []
    for arch in archs:
        for seed in seeds:
            for b in sizes:
                for kind in VARIANTS:
                    r = done.get((arch, seed, b, kind))
                    if r is None:
                        r = {**run(arch, kind, b, seed, data, epochs), "epochs": epochs}
                        with log.open("a") as f:
                            f.write(json.dumps(r) + "\n")
                    results.append(r)
                    print(f"{arch} seed {seed} batch {b:3d} {kind:7s} acc {r['test_acc']:.3f} "
                          f"loss {r['test_loss']:.3f} ({r['steps']} steps, {r['train_s']:.1f}s)", flush=True)
    tables = []
    for arch in archs:
        rows = []
        for b in sizes:
            row = [b]
            for kind in VARIANTS:
                rs = [r for r in results if r["model"] == arch and r["variant"] == kind and r["batch_size"] == b]
                acc_m, acc_s = U.mean_std([r["test_acc"] for r in rs])
                loss_m, loss_s = U.mean_std([r["test_loss"] for r in rs])
                row.append(f"{100 * acc_m:.1f} ± {100 * acc_s:.1f} / {loss_m:.3f} ± {loss_s:.3f}")
            rows.append(row)
        tables.append((f"{arch}: test accuracy (%) / cross-entropy, mean ± std over {len(seeds)} seed(s), "
                       f"{epochs} epoch(s)",
                       U.markdown_table(["batch size", *[f"{k}: acc % / loss" for k in VARIANTS]], rows)))
    U.write_results(outdir, "batch_size", {"results": results, "sizes": sizes, "epochs": epochs,
                                           "seeds": len(seeds), "models": archs}, tables)
    for arch in archs:
        plot(results, sizes, outdir / f"batch_size_{arch}.png", arch)
    print(f"files in {outdir}")


if __name__ == "__main__":
    main()

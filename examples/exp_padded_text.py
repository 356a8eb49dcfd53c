"""Padded sequences: LayerNorm vs token BatchNorm vs padding-aware token BN vs PowerNorm, on Python's own sources.

    python examples/exp_padded_text.py [--quick] [--outdir DIR] [--seeds 3] [--steps 500]

Data: lines of the standard-library source files of the Python running this script (real text
nobody here wrote): every line of 8 to 64 characters (ASCII, trailing spaces stripped) of the first
24 top-level modules in alphabetical order; the lines of every 4th file are the test set (unseen
files, not unseen lines). Batches of 32 random lines are right-padded to their longest line, so
about 40% of the positions are padding.

Task: masked character modelling (BERT-style): 20% of the real characters are replaced by a mask id
and predicted. Model: transformers' BertModel (2 layers, width 64, 4 heads, FFN 128, no dropout)
plus a linear head, trained with AdamW (lr 2e-3) for --steps steps. Variants:

- ``ln``         the model as built (5 LayerNorms);
- ``tbn``        LayerNorm -> token BatchNorm (``normsurgeon.convert(model, to="bn", padding_mask=None)``):
                 statistics over every position, padding included (what BN-in-NLP usually means);
- ``tbn_masked`` the same conversion with its default ``padding_mask="attention_mask"`` (it installs
                 ``normsurgeon.nn.capture_padding_mask``): statistics over real tokens only;
- ``pn``         ``normsurgeon.convert(model, to="pn")``: LayerNorm -> ``PowerNorm`` (warm-up a quarter of
                 the run), padding-aware.

Reported (mean ± std over seeds): masked-character accuracy and cross-entropy on the test files in
eval mode (running statistics), and training curves. Writes padded_text.png, padded_text.json and
padded_text.md to --outdir.
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import _exp_util as U

VARIANTS = ("ln", "tbn", "tbn_masked", "pn")
PAD, MASK, VOCAB = 0, 1, 128


def stdlib_lines(n_files: int = 24) -> tuple[list[str], list[str], list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))[:n_files]
    train, test = [], []
    for i, f in enumerate(files):
        lines = [ln.rstrip() for ln in f.read_text(encoding="utf-8", errors="replace").splitlines()]
        lines = [ln for ln in lines if 8 <= len(ln) <= 64 and ln.isascii()]
        (test if i % 4 == 3 else train).extend(lines)
    return train, test, [f.name for f in files]


def encode(lines: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in lines)
    ids = torch.full((len(lines), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(lines), width, dtype=torch.long)
    for i, s in enumerate(lines):
        codes = [max(ord(c), 2) for c in s]  # ids 0/1 are pad/mask; control chars (none in practice) -> 2
        ids[i, :len(s)] = torch.tensor(codes)
        mask[i, :len(s)] = 1
    return ids, mask


def corrupt(ids, mask, gen, rate: float = 0.2):
    hide = (torch.rand(ids.shape, generator=gen) < rate) & mask.bool()
    return ids.masked_fill(hide, MASK), hide


class MaskedCharModel(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        import transformers
        torch.manual_seed(seed)
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=64, pad_token_id=PAD,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.bert = transformers.BertModel(cfg, add_pooling_layer=False)
        self.head = nn.Linear(64, VOCAB)

    def forward(self, input_ids, attention_mask):
        return self.head(self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)


def build(kind: str, seed: int, steps: int) -> nn.Module:
    import normsurgeon
    from normsurgeon import CallArgs
    model = MaskedCharModel(seed)
    ids, mask = encode(["example line", "x = 1"])
    example = CallArgs((), {"input_ids": ids, "attention_mask": mask})
    # convert hooks BertModel's attention_mask into the new norms' batch statistics (the model's forward
    # is untouched; report.statistics says so); padding_mask=None keeps every position in them
    if kind in ("tbn", "tbn_masked"):
        model.bert, report = normsurgeon.convert(model.bert, to="bn", example_inputs=example,
                                                 padding_mask="attention_mask" if kind == "tbn_masked" else None)
    elif kind == "pn":
        model.bert, report = normsurgeon.convert(model.bert, to="pn", example_inputs=example,
                                                 pn_warmup_steps=max(steps // 4, 1))
    if kind != "ln":
        want = kind != "tbn"
        if report.statistics["padding_aware"] is not want:
            raise SystemExit(f"{kind}: expected padding-aware statistics {want}, got {report.statistics}")
    return model.train()


def evaluate(model, lines: list[str], seed: int = 1234, batch: int = 64) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    total_loss = correct = count = 0
    with torch.no_grad():
        for i in range(0, len(lines), batch):
            ids, mask = encode(lines[i:i + batch])
            inp, hide = corrupt(ids, mask, gen)
            if not hide.any():
                continue
            logits = model(inp, mask)[hide]
            total_loss += F.cross_entropy(logits, ids[hide], reduction="sum").item()
            correct += (logits.argmax(-1) == ids[hide]).sum().item()
            count += int(hide.sum())
    model.train()
    return correct / count, total_loss / count


def train(kind: str, seed: int, train_lines, test_lines, steps: int, batch: int = 32, eval_every: int = 100):
    model = build(kind, seed, steps)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    losses, curve, pad_frac = [], [], []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train_lines), (batch,), generator=gen).tolist()
        ids, mask = encode([train_lines[i] for i in idx])
        pad_frac.append(1 - mask.float().mean().item())
        inp, hide = corrupt(ids, mask, gen)
        loss = F.cross_entropy(model(inp, mask)[hide], ids[hide])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            curve.append((step, *evaluate(model, test_lines)))
    return {"variant": kind, "seed": seed, "losses": losses, "curve": curve, "test_acc": curve[-1][1],
            "test_loss": curve[-1][2], "train_s": time.perf_counter() - start,
            "pad_fraction": sum(pad_frac) / len(pad_frac),
            "diverged": not all(l == l and l < 1e4 for l in losses)}


def plot(results, outdir: Path) -> None:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = dict(zip(VARIANTS, ("C0", "C1", "C2", "C3")))
    for kind in VARIANTS:
        for i, r in enumerate(rs for rs in results if rs["variant"] == kind):
            ls = r["losses"]
            w = 20
            smooth = [sum(ls[max(0, j - w + 1):j + 1]) / len(ls[max(0, j - w + 1):j + 1]) for j in range(len(ls))]
            axes[0].plot(range(1, len(ls) + 1), smooth, color=colors[kind], alpha=0.7, lw=1,
                         label=kind if i == 0 else None)
            axes[1].plot([c[0] for c in r["curve"]], [c[2] for c in r["curve"]], color=colors[kind], alpha=0.7,
                         marker=".", label=kind if i == 0 else None)
    axes[0].set_title("training loss, masked chars (moving avg of 20), per seed")
    axes[1].set_title("test loss on unseen files (eval mode), per seed")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(outdir / "padded_text.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds: 1 seed, 20 steps, a few files")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--outdir", default=None)
    args = parser.parse_args(argv)
    U.require_extras()
    torch.set_num_threads(1)
    outdir = Path(args.outdir or tempfile.mkdtemp(prefix="exp-text-"))
    outdir.mkdir(parents=True, exist_ok=True)
    train_lines, test_lines, files = stdlib_lines(8 if args.quick else 24)
    if args.quick:
        test_lines = test_lines[:256]
    seeds = range(1 if args.quick else args.seeds)
    steps = 20 if args.quick else args.steps
    print(f"{len(train_lines)} train lines, {len(test_lines)} test lines from {len(files)} stdlib files "
          f"({files[0]} ... {files[-1]})", flush=True)
    results = []
    for seed in seeds:
        for kind in VARIANTS:
            r = train(kind, seed, train_lines, test_lines, steps, eval_every=10 if args.quick else 100)
            results.append(r)
            print(f"seed {seed} {kind:11s} test acc {r['test_acc']:.3f} loss {r['test_loss']:.3f}  "
                  f"train loss {r['losses'][0]:.3f} -> {sum(r['losses'][-20:]) / 20:.3f}  "
                  f"padding {100 * r['pad_fraction']:.0f}%  {r['train_s']:.0f}s"
                  + ("  DIVERGED" if r["diverged"] else ""), flush=True)
    rows = []
    for kind in VARIANTS:
        rs = [r for r in results if r["variant"] == kind]
        am, asd = U.mean_std([100 * r["test_acc"] for r in rs])
        lm, lsd = U.mean_std([r["test_loss"] for r in rs])
        tm, tsd = U.mean_std([sum(r["losses"][-50:]) / len(r["losses"][-50:]) for r in rs])
        rows.append([kind, f"{am:.1f} ± {asd:.1f}", f"{lm:.3f} ± {lsd:.3f}", f"{tm:.3f} ± {tsd:.3f}",
                     sum(r["diverged"] for r in rs)])
    pad = 100 * sum(r["pad_fraction"] for r in results) / len(results)
    table = U.markdown_table(["variant", "test acc % (eval)", "test loss (eval)", "train loss (last 50 steps)",
                              "diverged runs"], rows)
    plot(results, outdir)
    U.write_results(outdir, "padded_text",
                    {"results": results, "steps": steps, "seeds": len(seeds), "files": files,
                     "train_lines": len(train_lines), "test_lines": len(test_lines), "pad_percent": pad},
                    [(f"Masked-character modelling on stdlib lines ({pad:.0f}% padding), {steps} steps, "
                      f"{len(seeds)} seed(s)", table)])
    print(f"files in {outdir}")


if __name__ == "__main__":
    main()

"""Peak memory and wall time of `fold --affine` and `rotate` on a TinyLlama-shaped model, against
loading it and running one forward pass (issue 17 item 5).

The model: ``transformers.LlamaForCausalLM`` with TinyLlama-1.1B's config (22 layers, hidden 2048,
32 heads / 4 KV heads, FFN 5632, vocab 32000, untied head), random weights, RMSNorm γ randomized,
saved as a bf16 safetensors directory (``--layers N`` keeps the width with fewer layers; ``--quick``:
a tiny model). Then, in separate processes (``bench_fold_memory.run``: peak RSS from ``os.wait4``):

- baseline: ``normsurgeon.loading.load_model(DIR)`` + one forward pass on the example inputs, then the
  process ends as the ``normsurgeon`` command does, without Python's teardown (``cli.run``);
- fold:     ``normsurgeon fold DIR --affine --json`` (capture, fold in place, verify on 2 inputs, as every
  model of 1 GiB or more: ``verify.lean_inputs``;
  ``--skip-plain-fold`` leaves it out);
- fold -o:  the same, writing ``-o OUT/`` (recipe directory + config.json; the recipe writer checks the
  directory rebuilds bit-exactly: for a model this large on the meta device, reading the file back one
  tensor at a time, so no second copy);
- rotate:   ``normsurgeon rotate OUT/ --json`` on the folded directory (verified, nothing written);
- rotate -o: the same, writing ``-o ROT/``.

An untimed baseline runs first (not with ``--quick``): the model's file then sits in the page cache
for every round. Each step starts after an ``os.sync()``: what the step before it wrote is on disk,
not being written back beside it. ``--prime-gb N``: before each step, a child process touches and
frees N GiB (see main).

    python benchmarks/bench_llm_fold_memory.py --quick
    python benchmarks/bench_llm_fold_memory.py --workdir /tmp/tinyllama --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fold_memory import run  # noqa: E402

TINYLLAMA = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
QUICK = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             vocab_size=1000, max_position_embeddings=128, tie_word_embeddings=False)

# touches and frees this many GiB of fresh memory (``--prime-gb``): see main()
PRIME = """
import sys, torch
torch.ones(int(float(sys.argv[1]) * 2**30), dtype=torch.uint8)
"""

# ends as the command does (``cli.run``: no interpreter teardown, 0.8-0.9 s of it with torch and
# transformers imported), so that neither side of a ratio counts it
BASELINE = """
import os, sys, torch
from normsurgeon.loading import load_model
loaded = load_model(sys.argv[1])
with torch.no_grad():
    loaded.example_inputs.call(loaded.model.eval())
sys.stdout.flush()
os._exit(0)
"""


def build(path: Path, config: dict) -> int:
    import torch
    import transformers

    from normsurgeon.zoo_llm import randomize_norms

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**config, use_cache=False, torch_dtype="bfloat16")
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    randomize_norms(model)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="TinyLlama's width with this many layers")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-plain-fold", action="store_true", help="time only fold -o (and rotate on its output)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (paired ratios; median)")
    ap.add_argument("--steps", default="fold,fold -o,rotate,rotate -o",
                    help="which steps after the baseline (comma-separated; rotate needs fold -o in the same run)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the built model here (reused)")
    ap.add_argument("--prime-gb", type=float, default=0.0,
                    help="before each step (untimed), a child touches and frees this many GiB of memory")
    args = ap.parse_args()
    config = dict(QUICK if args.quick else TINYLLAMA)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    with tempfile.TemporaryDirectory(prefix="normsurgeon-bench-llm-") as tmp:
        where = args.workdir or Path(tmp)
        model = where / f"llama_{config['hidden_size']}x{config['num_hidden_layers']}"
        t0 = time.perf_counter()
        params = None
        if not (model / "config.json").exists():
            # built in a child: a child's peak RSS starts from its parent's, so the parent stays small
            build_cmd = [sys.executable, "-c", f"import sys; sys.path[:0] = {[str(ROOT), str(ROOT / 'benchmarks')]!r}; "
                         f"from bench_llm_fold_memory import build; from pathlib import Path; "
                         f"print(build(Path({str(model)!r}), {config!r}))"]
            _, _, _, code, stdout = run(build_cmd)
            if code != 0:
                raise SystemExit("building the model failed")
            params = int(stdout.strip().splitlines()[-1])
        size = sum(f.stat().st_size for f in model.iterdir()) / 2 ** 20
        print(f"model: {model.name}, {params and f'{params / 1e6:.0f}M parameters, '}{size:.0f} MiB on disk "
              f"(ready in {time.perf_counter() - t0:.0f} s)", flush=True)
        out, rotated = Path(tmp) / "folded", Path(tmp) / "rotated"
        py = sys.executable
        kinds = {"baseline": [py, "-c", BASELINE, str(model)],
                 **({} if args.skip_plain_fold else
                    {"fold": [py, "-m", "normsurgeon", "fold", str(model), "--affine", "--json"]}),
                 "fold -o": [py, "-m", "normsurgeon", "fold", str(model), "--affine", "--json", "-o", f"{out}/"],
                 "rotate": [py, "-m", "normsurgeon", "rotate", f"{out}/", "--json"],
                 "rotate -o": [py, "-m", "normsurgeon", "rotate", f"{out}/", "--json", "-o", f"{rotated}/"]}
        steps = {k.strip() for k in args.steps.split(",")}
        kinds = {k: v for k, v in kinds.items() if k == "baseline" or k in steps}
        result = {"config": config, "size_mib": size, "rounds": []}
        # Interleaved rounds (baseline, then each step): the shared machine's load drifts, and a ratio
        # of runs next to each other is steadier than one of runs minutes apart.
        # One untimed baseline first: the first read of the model's file (10.7 s against 4.1 s once it
        # is in the page cache) would otherwise make round 1's ratios a third of the others. Not in
        # quick mode: its model was just written, and the suite runs that mode.
        os.sync()
        if not args.quick:
            run(kinds["baseline"])
        for rnd in range(args.rounds):
            runs = {}
            for kind, cmd in kinds.items():
                if kind in ("fold -o", "rotate -o"):
                    shutil.rmtree(out if kind == "fold -o" else rotated, ignore_errors=True)
                # the 2.2 GB a previous step wrote are flushed before the next starts: the kernel's
                # write-back beside a step cost it 2-4 s of system time on this VM (rotate right after
                # fold -o: 15.9 s; after a sync: 13.8 s)
                os.sync()
                if args.prime_gb > 0:
                    # On a VM that hands freed memory back to its host (free page reporting), a page
                    # touched for the first time since costs a fault in the host too: 1.8-2.6 s/GB on
                    # ours, against 0.2-0.4 s/GB for memory freed a moment ago. A step that makes
                    # 2.2 GB of new weights then pays seconds the baseline (its weights are the page
                    # cache) never does, and more or less by the minute. Priming gives every step,
                    # the baseline too, recently freed memory, as a machine without a balloon has.
                    run([py, "-c", PRIME, str(args.prime_gb)])
                wall, cpu, rss, code, stdout = run(cmd)
                summary = ""
                try:
                    rep = json.loads(stdout)
                    v = rep.get("verify", {})
                    summary = f" [passed {v.get('passed')}, max rel error {v.get('max_rel_error')}]"
                except ValueError:
                    pass
                runs[kind] = {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": rss, "exit": code}
                print(f"round {rnd + 1} {kind:9s} {wall:7.1f} s wall {cpu:7.1f} s CPU  peak RSS {rss:7.0f} MiB  "
                      f"exit {code}{summary}", flush=True)
            result["rounds"].append(runs)
        for kind in kinds:
            if kind == "baseline":
                continue
            mem = sorted(r[kind]["peak_rss_mib"] / r["baseline"]["peak_rss_mib"] for r in result["rounds"])
            wall = sorted(r[kind]["wall_s"] / r["baseline"]["wall_s"] for r in result["rounds"])
            cpu = sorted(r[kind]["cpu_s"] / r["baseline"]["cpu_s"] for r in result["rounds"])
            spread = f" (range {wall[0]:.2f}-{wall[-1]:.2f})" if len(wall) > 1 else ""
            print(f"{kind}: {statistics.median(mem):.2f}x baseline peak memory, {statistics.median(wall):.2f}x its "
                  f"wall time{spread}, {statistics.median(cpu):.2f}x its CPU time; median of {len(wall)} paired "
                  "rounds (targets 1.3x, 2.5x)")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))

if __name__ == "__main__":
    main()

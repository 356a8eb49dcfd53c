"""Wall time and peak memory of loading a recipe directory, against building the plain model.

The model: a ViT (``transformers.ViTForImageClassification``, hidden 1024, 12 layers, FFN 4096,
~150M parameters, random weights) converted to BatchNorm (``convert --to bn --ffn-bn``) and saved as
a recipe directory (``normsurgeon.save``: recipe.json + model.safetensors). Then, in separate
processes, interleaved (``--repeats`` rounds), each after the same imports:

- imports:  ``import normsurgeon, transformers`` only (the floor every process pays);
- plain:    ``ViTForImageClassification(config)`` (building the model the recipe starts from);
- recipe:   ``normsurgeon.load(DIR)`` (build the base, replay the conversion, load the weights).

For each process: its peak RSS (``VmHWM``, read by the child: ``ru_maxrss`` would report this
parent's size at fork time), wall and CPU time, the load average. Printed: recipe/plain ratios per
round and their median, of the whole process and of the part after the imports (time) or above
them (memory). Target (issue 19 item 9): recipe <= 1.3x the time and <= 1.15x the memory of
building the plain model.

    python benchmarks/bench_recipe_load.py            # ~150M parameters: ~1 minute, ~2 GB RAM
    python benchmarks/bench_recipe_load.py --quick    # a small ViT, seconds (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LARGE = dict(image_size=224, patch_size=16, hidden_size=1024, num_hidden_layers=12, num_attention_heads=16,
             intermediate_size=4096, num_labels=1000)
QUICK = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=128, num_labels=10)

PRELUDE = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, transformers, normsurgeon
transformers.ViTForImageClassification, transformers.ViTConfig  # transformers imports its models lazily
t0, c0 = time.perf_counter(), time.process_time()
"""
# Peak RSS is the child's own VmHWM: ru_maxrss (getrusage, wait4) keeps the high-water mark of the
# process image before exec, i.e. of this (large) parent at fork time, which hides the child's own.
REPORT = """
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
print(json.dumps({'inner_s': elapsed, 'inner_cpu_s': time.process_time() - c0, 'peak_rss_mib': hwm}))
"""
IMPORTS = PRELUDE + "elapsed = time.perf_counter() - t0\n" + REPORT
PLAIN = PRELUDE + """
model = transformers.ViTForImageClassification(transformers.ViTConfig(**json.loads(sys.argv[1]))).eval()
elapsed = time.perf_counter() - t0
""" + REPORT
RECIPE = PRELUDE + """
model = normsurgeon.load(sys.argv[1])
elapsed = time.perf_counter() - t0
""" + REPORT


def build(where: Path, config: dict) -> int:
    """The converted ViT as a recipe directory at ``where``; returns its parameter count."""
    import torch
    import transformers

    import normsurgeon
    from normsurgeon import replay
    from normsurgeon.inputs import CallArgs

    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**config)).eval()
    size = config["image_size"]
    example = CallArgs((), {"pixel_values": torch.randn(1, 3, size, size)})
    bn, _ = normsurgeon.convert(model, "bn", example_inputs=example, ffn_bn=True, inplace=True)
    replay.save(bn, where, example_inputs=example, force=True, check=False)
    return sum(p.numel() for p in bn.parameters())


def run(cmd: list[str]) -> tuple[float, float, float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in MiB, wall and CPU seconds after the imports) of one child."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:3])}... failed: {stderr.strip()[-800:]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    return wall, usage.ru_utime + usage.ru_stime, report["peak_rss_mib"], report["inner_s"], report["inner_cpu_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small ViT (seconds), a smoke run")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the recipe here and reuse it")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = ap.parse_args()
    config = QUICK if args.quick else LARGE

    with tempfile.TemporaryDirectory(prefix="normsurgeon-bench-recipe-") as tmp:
        where = (args.workdir or Path(tmp)) / f"vit_bn_{'quick' if args.quick else 'large'}"
        t0 = time.perf_counter()
        if not (where / "recipe.json").is_file():
            params = build(where, config)
        else:
            params = 0
        size = sum(f.stat().st_size for f in where.iterdir())
        print(f"recipe: ViT {'(quick)' if args.quick else 'large'} converted to BN, "
              f"{f'{params / 1e6:.0f}M parameters, ' if params else ''}{size / 2 ** 20:.0f} MiB on disk "
              f"(ready in {time.perf_counter() - t0:.0f} s)")
        py = sys.executable
        kinds = {"imports": [py, "-c", IMPORTS], "plain": [py, "-c", PLAIN, json.dumps(config)],
                 "recipe": [py, "-c", RECIPE, str(where)]}
        rows: dict[str, list[tuple[float, ...]]] = {k: [] for k in kinds}
        load_before = os.getloadavg()[0]
        for r in range(args.repeats):
            for kind, cmd in kinds.items():
                rows[kind].append(run(cmd))
                wall, cpu, rss, inner, inner_cpu = rows[kind][-1]
                print(f"round {r + 1}: {kind:8s} {wall:6.1f} s wall {cpu:6.1f} s CPU, after the imports {inner:6.2f} s "
                      f"wall {inner_cpu:6.2f} s CPU, "
                      f"peak RSS {rss:7.0f} MiB (load average {os.getloadavg()[0]:.1f})", flush=True)
        load_after = os.getloadavg()[0]

    def ratios(i: int, minus_imports: bool) -> list[float]:
        out = []
        for rec, plain, imp in zip(rows["recipe"], rows["plain"], rows["imports"]):
            a, b = rec[i], plain[i]
            if minus_imports:
                a, b = a - imp[i], b - imp[i]
            out.append(a / b if b > 0 else float("nan"))
        return out

    figures = {"memory (peak RSS)": ratios(2, False), "memory above the imports": ratios(2, True),
               "wall time after the imports": ratios(3, False), "CPU time after the imports": ratios(4, False),
               "CPU time (whole process)": ratios(1, False)}
    print(f"load average {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs")
    for name, rs in figures.items():
        print(f"recipe / plain, {name}: {statistics.median(rs):.2f}x (rounds {min(rs):.2f}-{max(rs):.2f})")
    print("target: <= 1.3x time, <= 1.15x memory")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "rows": rows, "params": params,
                                         "load_average": [load_before, load_after]}, indent=2))


if __name__ == "__main__":
    main()

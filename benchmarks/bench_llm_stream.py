"""Peak memory and wall time of `fold --affine --stream -o OUT/` (issue 17 must-hold 5): the norm-affine
fold of a transformers directory shard by shard, planned on a tiny twin, never loading the model.

Each step is a separate process (``bench_fold_memory.run``: peak RSS from ``os.wait4``):

- imports: ``import torch, transformers, normsurgeon.api`` alone (what any command pays first);
- stream:  ``normsurgeon fold DIR --affine --stream -o OUT/ --json``;
- rotate (``--rotate``): ``normsurgeon rotate OUT --stream --seed 0 -o ROT/ --json`` on the streamed fold;
- compare (``--compare``): the original and the streamed directory loaded one after the other in plain
  transformers as float32, logits on one short input compared (max relative error). This is a check
  the stream itself does not make (it checks each site locally): it needs the whole model in memory.

    python benchmarks/bench_llm_stream.py --quick
    python benchmarks/bench_llm_stream.py --model /tmp/tl/llama_2048x22 --compare --rotate --json out.json

Without ``--model``, a TinyLlama-shaped directory is built as bench_llm_fold_memory does (``--quick``: a
tiny one) in a temporary or ``--workdir`` directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fold_memory import run  # noqa: E402
from bench_llm_fold_memory import QUICK, TINYLLAMA  # noqa: E402

IMPORTS = "import torch, transformers, normsurgeon.api"

COMPARE = """
import json, sys, torch, transformers
ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
logits = []
for d in sys.argv[1:3]:
    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        logits.append(m(input_ids=ids).logits.double())
    del m
a, b = logits
print(json.dumps({"max_rel_error": ((a - b).abs().max() / a.abs().max()).item()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model (seconds), a smoke run")
    ap.add_argument("--model", type=Path, default=None, help="an existing transformers directory (read only)")
    ap.add_argument("--workdir", type=Path, default=None, help="build the model here (reused) and write OUT here")
    ap.add_argument("--max-shard-mb", type=int, default=None)
    ap.add_argument("--compare", action="store_true", help="also compare logits of the original and the output")
    ap.add_argument("--rotate", action="store_true", help="also rotate the streamed fold, streamed")
    ap.add_argument("--keep", action="store_true", help="keep the output directories")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="normsurgeon-bench-stream-") as tmp:
        where = args.workdir or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        model = args.model
        if model is None:
            config = dict(QUICK if args.quick else TINYLLAMA)
            model = where / f"llama_{config['hidden_size']}x{config['num_hidden_layers']}"
            if not (model / "config.json").exists():
                code = run([py, "-c", f"import sys; sys.path[:0] = {[str(ROOT), str(ROOT / 'benchmarks')]!r}; "
                                      "from bench_llm_fold_memory import build; from pathlib import Path; "
                                      f"build(Path({str(model)!r}), {config!r})"])[3]
                if code != 0:
                    raise SystemExit("building the model failed")
        size = sum(f.stat().st_size for f in model.iterdir()) / 2 ** 20
        print(f"model: {model}, {size:.0f} MiB on disk", flush=True)
        out = where / "streamed"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [py, "-m", "normsurgeon", "fold", str(model), "--affine", "--stream", "-o", f"{out}/", "--json"]
        if args.max_shard_mb:
            cmd += ["--max-shard-mb", str(args.max_shard_mb)]
        rot = where / "rotated"
        shutil.rmtree(rot, ignore_errors=True)
        steps = {"imports": [py, "-c", IMPORTS], "stream": cmd}
        if args.compare:
            steps["compare"] = [py, "-c", COMPARE, str(model), str(out)]
        if args.rotate:
            steps["rotate"] = [py, "-m", "normsurgeon", "rotate", str(out), "--stream", "--seed", "0", "-o", f"{rot}/",
                               "--json"]
            if args.compare:
                steps["compare rotated"] = [py, "-c", COMPARE, str(model), str(rot)]
        result = {"model": str(model), "size_mib": size, "runs": {}}
        for kind, c in steps.items():
            wall, cpu, rss, code, stdout = run(c)
            note = ""
            try:
                rep = json.loads(stdout)
            except ValueError:
                rep = None
            if kind == "stream" and rep:
                s = rep["summary"]
                note = (f" [folded {s['folded']}, skipped {s['skipped']}, rolled back {s['rolled_back']}; max local "
                        f"rel error {rep['verify']['max_rel_error']:.2e} <= {rep['verify']['tolerance']}; twin "
                        f"{rep['stream']['twin']['folded']} folds, {rep['stream']['shards']} shards]")
                result["report"] = rep
            elif kind == "rotate" and rep:
                note = (f" [rotated {rep['rotated']}: {rep['stream']['rotated_tensors']} tensors, width {rep['width']}, "
                        f"max rel error of undoing it {rep['verify']['max_rel_error']:.2e}]")
                result["rotate_report"] = rep
            elif kind.startswith("compare") and rep:
                what = "rotated" if kind.endswith("rotated") else "streamed"
                note = f" [logits, float32, original vs {what}: max rel error {rep['max_rel_error']:.2e}]"
                result[kind.replace(" ", "_")] = rep
            result["runs"][kind] = {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": rss, "exit": code}
            print(f"{kind:8s} {wall:7.1f} s wall {cpu:7.1f} s CPU  peak RSS {rss:7.0f} MiB  exit {code}{note}",
                  flush=True)
        for kind in ("rotate", "stream"):
            r = result["runs"].get(kind)
            if r is None:
                continue
            if r["exit"] != 0:  # a run that failed early has a small peak and says nothing about the target
                print(f"{kind}: FAILED (exit {r['exit']}), no figure")
                continue
            verdict = "under" if r["peak_rss_mib"] < 1024 else "OVER"
            print(f"{kind} peak RSS {r['peak_rss_mib']:.0f} MiB: {verdict} 1 GiB"
                  + (f" (imports alone {result['runs']['imports']['peak_rss_mib']:.0f} MiB)" if kind == "stream" else ""))
        failed = [k for k, r in result["runs"].items() if r["exit"] != 0]
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(rot, ignore_errors=True)
        if failed:
            raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

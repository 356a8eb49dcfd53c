"""ONNX Runtime latency of a GPT-2-small-shaped model before and after the exact LayerNorm → RMSNorm.

The model: ``transformers.GPT2LMHeadModel`` with GPT-2 small's shape (12 layers, hidden 768, 12 heads,
vocab 50257; ``--quick``: a tiny one), random weights, LayerNorm γ/β randomized. ``convert(to="rms",
untie=True)`` (affines folded, residual stream centred, every LayerNorm an ``nn.RMSNorm``); both are
exported with dynamic batch/sequence and verified in ORT, then timed by ``normsurgeon.bench``
(1 intra-op thread, models interleaved, paired ratios with their spread). The norm ops each ONNX
file holds are printed too: what ORT runs for an RMSNorm decides the result.

    python benchmarks/bench_llm_rms.py --quick          # seconds: a smoke run
    python benchmarks/bench_llm_rms.py --seq 128 --runs 200 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMALL = dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
QUICK = dict(n_embd=64, n_layer=2, n_head=2, vocab_size=1000, n_positions=128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import torch
    import transformers

    from normsurgeon import zoo_llm
    from normsurgeon.bench import measure_latency
    from normsurgeon.onnx import export_onnx
    from normsurgeon.passes.convert import convert

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**(QUICK if args.quick else SMALL), use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    zoo_llm.randomize_norms(model)
    ids = {"input_ids": torch.randint(0, cfg.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))}
    rms, report = convert(model, "rms", example_inputs=ids, untie=True)
    assert report.verify["passed"] and not report.skipped, report.to_json()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_llm_rms."))
    work.mkdir(parents=True, exist_ok=True)
    files, ops = [], {}
    for name, m in (("layernorm", model), ("rmsnorm", rms)):
        path = work / f"gpt2_{name}.onnx"
        exp = export_onnx(m, ids, path, force=True)
        assert exp.verify.passed, exp.verify
        files.append(path)
        ops[name] = exp.norm_ops
    bench = measure_latency(files, dims={"batch": 1, "sequence": args.seq}, runs=args.runs)
    out = {"config": QUICK if args.quick else SMALL, "seq": args.seq, "norm_ops": ops,
           "rms_conversion_max_rel_error": report.verify["max_rel_error"], "bench": bench.to_json()}
    print(json.dumps(out, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()

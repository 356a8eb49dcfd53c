"""Loading a recipe builds one model, not two (issue 19 item 9): the base's parameters are never
allocated or initialised (meta device, then the saved tensors handed over one by one); tied weights
and computed (non-persistent) buffers survive. The time/memory ratios on a ~150M-parameter ViT are in
benchmarks/bench_recipe_load.py; here the peak memory of a load is measured in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import normsurgeon
from normsurgeon import replay, zoo
from normsurgeon.inputs import CallArgs

CLEAR_REFS = Path("/proc/self/clear_refs")
ROOT = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


# A fresh process: in this one, memory freed by earlier tests stays resident in the allocator's pools
# and a load could reuse it without the RSS growing.
MEASURE = """
import sys, pathlib, warnings
warnings.filterwarnings("ignore")
import transformers, normsurgeon
transformers.ViTForImageClassification  # the lazy import, before measuring
def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024
before = status("VmRSS")
pathlib.Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts at the current RSS
model = normsurgeon.load(sys.argv[1])
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not CLEAR_REFS.exists(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_loading_a_recipe_allocates_one_model(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=512, num_hidden_layers=6,
                                    num_attention_heads=8, intermediate_size=2048, num_labels=10)
    model = transformers.ViTForImageClassification(config).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size > 70 * 2 ** 20  # large enough that a second copy stands out of the noise
    ci = CallArgs((), {"pixel_values": torch.randn(1, 3, 32, 32)})
    replay.save(model, tmp_path / "r/", example_inputs=ci)  # checked: the rebuild is bit-exact
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "r")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    peak = int(run.stdout.split()[-1])
    # one model is `size`; building a random base and then reading the whole file took about 2x
    assert peak < 1.35 * size, f"peak {peak / 2 ** 20:.0f} MiB for a {size / 2 ** 20:.0f} MiB model"


def test_tied_weights_and_computed_buffers_survive_the_empty_build(tmp_path):
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100,
                                                               n_positions=16)).eval()
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    ids = CallArgs((), {"input_ids": torch.randint(0, 100, (2, 8))})
    replay.save(gpt, tmp_path / "g/", example_inputs=ids)
    loaded = normsurgeon.load(tmp_path / "g")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    with torch.no_grad():
        assert torch.equal(loaded(**ids.kwargs).logits, gpt(**ids.kwargs).logits)

    # Llama's rotary inverse frequencies are a non-persistent buffer, computed when the model is built
    llama = zoo.llama()
    ci = llama.example_inputs()
    replay.save(llama, tmp_path / "l/", example_inputs=ci)
    back = normsurgeon.load(tmp_path / "l")
    for (name, a), (_, b) in zip(llama.named_buffers(), back.named_buffers()):
        assert torch.equal(a, b), name

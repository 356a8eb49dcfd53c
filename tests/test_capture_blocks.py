"""graph.capture with a run of identical blocks exported once (``repeat_blocks``): the graph it rebuilds
is the whole export's node for node, on every tiny architecture of ``zoo_llm`` built with 5 layers
(3 traced, 2 copied: a copy of a copy included); blocks that differ fall back to the whole export;
the passes give the same reports either way."""

import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from normsurgeon import zoo_llm
from normsurgeon.graph import capture
from normsurgeon.graph.blocks import find_runs
from normsurgeon.graph.node import GNode
from normsurgeon.inputs import CallArgs
from normsurgeon.passes.fold import fold
from normsurgeon.passes.rotate import rotate
from normsurgeon.verify import as_call_args

capture_mod = importlib.import_module("normsurgeon.graph.capture")  # the package's `capture` is the function
LAYERS = 5
# Gemma-2 alternates sliding-window and full attention (per-block `sliding_window`, `layer_type`)
FALLS_BACK = {"gemma2"}


def _deeper(model, layers=LAYERS):
    """``model``'s architecture rebuilt from its config with ``layers`` blocks, norms randomized."""
    d = model.config.to_dict()
    d["n_layer" if "n_layer" in d else "num_hidden_layers"] = layers
    d.pop("layer_types", None)  # derived from the layer count
    torch.manual_seed(0)
    deeper = type(model)(type(model.config).from_dict(d)).eval()
    zoo_llm.randomize_norms(deeper)
    deeper.example_inputs = model.example_inputs
    return deeper


def canonical(nodes):
    """Everything a pass reads of a graph, with node references as positions (names may differ)."""
    pos = {id(n): i for i, n in enumerate(nodes)}

    def ref(a):
        if isinstance(a, GNode):
            return ("node", pos[id(a)])
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(ref(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, ref(v)) for k, v in a.items()))
        return a

    assert len({n.name for n in nodes}) == len(nodes)  # names unique
    return [(n.op, n.target, n.module_path, n.call_key, tuple(n.module_stack), n.shape, n.dtype, n.param,
             n.leaf_module, ref(n.args), ref(n.kwargs), tuple(pos[id(u)] for u in n.users)) for n in nodes]


@pytest.mark.parametrize("name", sorted(zoo_llm.MODELS))
def test_repeated_blocks_give_the_whole_exports_graph(name):
    model = _deeper(zoo_llm.MODELS[name]())
    ci = as_call_args(model.example_inputs())
    whole = capture(model, ci, repeat_blocks=False)
    once = capture(model, ci, repeat_blocks=True)
    assert whole.describe() == "export" and once.method == "export"
    if name in FALLS_BACK:
        assert once.describe() == "export" and not find_runs(model)
    else:
        runs = find_runs(model)
        assert len(runs) == 1 and runs[0].n == LAYERS
        assert once.describe() == (f"export (3 of 5 blocks of {runs[0].path} traced (0, 1, 4), "
                                   f"2 repeated from {runs[0].path}.1)"), once.attempts
        assert not once.attempts
    assert canonical(once.nodes) == canonical(whole.nodes)
    assert dict(model.named_modules()).keys() == dict(once.model.named_modules()).keys()  # the list restored


# --- fallbacks ------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, i, n, scale=1.0, special=None):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.layer_idx, self.last, self.scale, self.special = i, n - 1, scale, special

    def forward(self, x):
        y = self.fc(x) * self.scale
        if self.special == "last" and self.layer_idx == self.last:  # a forward that branches on its index
            y = y.relu()
        if self.special == "first" and self.layer_idx == 0:
            y = y.tanh()
        return x + y


class Net(nn.Module):
    def __init__(self, n=5, indexed=False, **kw):
        super().__init__()
        self.layers = nn.ModuleList(Block(i, n, **kw) for i in range(n))
        self.n, self.indexed = n, indexed
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if self.indexed:  # as a model reading `self.layers[i] for i in range(config.num_hidden_layers)`
            for i in range(self.n):
                x = self.layers[i](x)
        else:
            for layer in self.layers:
                x = layer(x)
        return self.head(x)


def _net_inputs():
    return CallArgs((torch.randn(2, 8),), {})


def _both(model):
    ci = _net_inputs()
    return capture(model, ci, repeat_blocks=True), capture(model, ci, repeat_blocks=False)


def test_identical_plain_blocks_are_repeated():
    once, whole = _both(Net())
    assert once.describe() == "export (3 of 5 blocks of layers traced (0, 1, 4), 2 repeated from layers.1)"
    assert canonical(once.nodes) == canonical(whole.nodes)
    assert [n.param for n in once.ops("param")] == [n.param for n in whole.ops("param")]


def test_blocks_differing_in_a_scalar_attribute_are_exported_whole():
    model = Net()
    model.layers[3].scale = 2.0  # changes block 3's forward, which the short export never traces
    assert not find_runs(model)
    once, whole = _both(model)
    assert once.describe() == "export" and not once.attempts
    assert canonical(once.nodes) == canonical(whole.nodes)


def test_gpt2_scaling_attention_by_its_layer_index_is_exported_whole():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, scale_attn_by_inverse_layer_idx=True)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    assert not find_runs(model)  # each block's attention `scaling` is 1 / (layer_idx + 1) of the last
    ci = as_call_args({"input_ids": torch.randint(0, 96, (2, 10))})
    once = capture(model, ci, repeat_blocks=True)
    assert once.describe() == "export"
    assert canonical(once.nodes) == canonical(capture(model, ci, repeat_blocks=False).nodes)


@pytest.mark.parametrize("special", ["first", "last"])
def test_a_forward_branching_on_its_index_is_caught_on_the_traced_blocks(special):
    model = Net(special=special)
    assert find_runs(model)  # the modules alone look identical: layer_idx steps with the index
    once, whole = _both(model)
    assert once.describe() == "export"
    assert [m for m, _ in once.attempts] == ["export of repeated blocks once"]
    assert "differs" in once.attempts[0][1] or "traced" in once.attempts[0][1]
    assert canonical(once.nodes) == canonical(whole.nodes)
    assert any(n.op == ("relu" if special == "last" else "tanh") for n in once.nodes)


def test_a_model_indexing_its_full_list_falls_back_and_keeps_its_list():
    model = Net(indexed=True)
    layers = model.layers
    once, whole = _both(model)
    assert model.layers is layers and len(model.layers) == 5  # restored after the failed export
    assert once.describe() == "export" and "picks blocks of the list by position" in once.attempts[0][1]
    assert canonical(once.nodes) == canonical(whole.nodes)


class Split(Net):
    """A norm between two slices of the list, cut at a count (as transformers' Dory does), and a scale
    computed from the list's length: on a shortened list both would be silently wrong."""

    def __init__(self, how, **kw):
        super().__init__(n=6, **kw)
        self.how, self.mid = how, nn.LayerNorm(8)

    def forward(self, x):
        if self.how == "split":
            for layer in self.layers[:4]:
                x = layer(x)
            x = self.mid(x)
            for layer in self.layers[4:]:
                x = layer(x)
        else:
            x = x / len(self.layers) ** 0.5
            for layer in self.layers:
                x = layer(x)
        return self.head(x)


@pytest.mark.parametrize("how", ["split", "len"])
def test_a_forward_that_slices_or_counts_the_list_is_exported_whole(how):
    model = Split(how)
    assert find_runs(model)
    once, whole = _both(model)
    assert once.describe() == "export" and "NotRepeatable" not in once.describe()
    assert ("counts" if how == "len" else "by position") in once.attempts[0][1]
    assert canonical(once.nodes) == canonical(whole.nodes)
    assert len(model.layers) == 6


def test_a_full_slice_of_the_list_is_the_list():
    """Llama iterates ``self.layers[:config.num_hidden_layers]``: still repeated."""
    class Sliced(Net):
        def forward(self, x):
            for layer in self.layers[:self.n]:
                x = layer(x)
            return self.head(x)

    once, whole = _both(Sliced())
    assert once.describe().startswith("export (3 of 5 blocks")
    assert canonical(once.nodes) == canonical(whole.nodes)


def test_blocks_differing_in_a_private_attribute_are_exported_whole():
    class Acts(Block):
        def forward(self, x):
            y = super().forward(x)
            return y.tanh() if self._act else y

    model = Net()
    model.layers = nn.ModuleList(Acts(i, 5) for i in range(5))
    for i, b in enumerate(model.layers):
        b._act = i == 2
    assert not find_runs(model)
    once, whole = _both(model)
    assert once.describe() == "export"
    assert canonical(once.nodes) == canonical(whole.nodes)


class ByConfig(Net):
    """Picks one middle layer's behaviour from a per-layer config list by the loop's index: the
    traced blocks 0, 1 and 4 would not show it."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(layer_types=["plain", "plain", "plain", "tanh", "plain"])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.config.layer_types[i] == "tanh":
                x = x.tanh()
        return self.head(x)


def test_a_per_layer_config_list_is_exported_whole():
    model = ByConfig()
    assert not find_runs(model)
    once, whole = _both(model)
    assert once.describe() == "export" and canonical(once.nodes) == canonical(whole.nodes)
    model.config.layer_types[3] = "plain"  # the same for every layer: repeated
    assert find_runs(model)


def test_shared_or_hooked_blocks_are_not_repeated():
    model = Net()
    model.layers[4].fc.weight = model.layers[0].fc.weight  # tied across blocks
    assert not find_runs(model)
    model = Net()
    model.layers[2].register_forward_hook(lambda m, i, o: o * 2)
    assert not find_runs(model)


def test_on_by_default_from_a_gibibyte_of_weights():
    assert not capture_mod._repeats(Net(), None)
    with torch.device("meta"):
        big = nn.Linear(16384, 16384, bias=False)  # exactly 1 GiB of float32, no memory
    assert capture_mod._repeats(big, None) and not capture_mod._repeats(big, False)


# --- the passes see the same graph ----------------------------------------------------------------

def _report(rep):
    out = rep.to_json()
    out.pop("capture")
    return out


def test_affine_fold_and_rotate_report_the_same_with_blocks_repeated(monkeypatch):
    base = _deeper(zoo_llm.llama())
    x = base.example_inputs()
    results = []
    for forced in (False, True):
        monkeypatch.setattr(capture_mod, "_repeats", lambda model, repeat, forced=forced: forced)
        folded, rep = fold(base, x, affine=True)
        rotated, rot = rotate(folded, x, seed=0)
        assert ("repeated" in rep.capture) is forced and ("repeated" in rot.capture) is forced
        assert rep.passed and len(rep.folded) == 2 * LAYERS + 1 and rot.rotated
        results.append((_report(rep), _report(rot), [t.detach().clone() for t in rotated.state_dict().values()]))
    (f0, r0, w0), (f1, r1, w1) = results
    assert f0 == f1 and r0 == r1
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))


def test_the_streamed_folds_tiny_twin_exports_its_layers_once():
    import transformers

    from normsurgeon import twin
    from normsurgeon.inputs import inputs_from_hf_config
    from normsurgeon.shard_stream import capture_twin

    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                                      num_attention_heads=8, num_key_value_heads=4)
    model = twin.build(config, transformers.LlamaForCausalLM)
    ci = inputs_from_hf_config(model.config)
    graph = capture_twin(model, ci, transformers.LlamaForCausalLM)
    assert graph.describe() == "export (3 of 6 blocks of model.layers traced (0, 1, 5), 3 repeated from model.layers.1)"
    assert canonical(graph.nodes) == canonical(capture(model, ci, repeat_blocks=False).nodes)

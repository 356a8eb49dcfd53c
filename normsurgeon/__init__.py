"""normsurgeon: find, convert, fold and export normalization layers of PyTorch models, verified.

    report = normsurgeon.inspect(model, example_inputs)
    bn_model, report = normsurgeon.convert(model, to="bn", example_inputs=x, ffn_bn=True)
    normsurgeon.calibrate(bn_model, batches)
    folded, report = normsurgeon.fold(bn_model, x)
    folded_ep, report = normsurgeon.fold(torch.export.load("m.pt2"))   # a program in, a program out
    report = normsurgeon.export(folded, x, "model.onnx", force=True)       # verified in ONNX Runtime
    folded, report = normsurgeon.fold("model.pt", trust=True, output="folded/")  # what `normsurgeon fold` does
    folded, report = normsurgeon.fold("model.onnx", output="folded.onnx")  # an ONNX graph, verified in ORT
    report = normsurgeon.measure_latency(["a.onnx", "b.onnx"])
    normsurgeon.save(bn_model, "bn_model/")        # a recipe directory: JSON + safetensors, no pickle
    model = normsurgeon.load("bn_model/")           # rebuilt: base + replayed surgery + weights
"""

__version__ = "0.3.0"

# Every public name lives in the module of its concern (see docs/ARCHITECTURE.md); they are
# gathered here, and in ``normsurgeon.api`` with everything the CLI can do.
from .errors import NormSurgeonError, VerificationError  # noqa: E402
from .inputs import CallArgs  # noqa: E402
from .loading import load_model, save_model  # noqa: E402
from .outputs import compare_outputs, flatten_outputs  # noqa: E402
from .graph import capture  # noqa: E402
from .find import find_norms  # noqa: E402
from .passes.convert import insert_ffn_bn  # noqa: E402
from .calibrate import calibrate, load_calibration_data, synthetic_batches  # noqa: E402
from .nn import ChannelLayerNorm, FrozenBatchNorm, TokenBatchNorm  # noqa: E402
from .onnx import count_norm_ops, export_onnx, verify_onnx  # noqa: E402
from .bench import measure_latency  # noqa: E402
from .replay import apply_recipe, load, save  # noqa: E402
# one signature per verb, the CLI's own: a model object or a path/spec, output=, inputs_file=, force=...
from .api import convert, export, fold, inspect, rotate, write_inputs  # noqa: E402

__all__ = [
    "__version__", "NormSurgeonError", "VerificationError", "CallArgs",
    "load_model", "save_model", "compare_outputs", "flatten_outputs", "capture",
    "inspect", "find_norms", "fold", "convert", "insert_ffn_bn", "export", "write_inputs", "rotate",
    "calibrate", "load_calibration_data", "synthetic_batches",
    "TokenBatchNorm", "ChannelLayerNorm", "FrozenBatchNorm",
    "export_onnx", "verify_onnx", "count_norm_ops", "measure_latency", "load", "save", "apply_recipe",
]

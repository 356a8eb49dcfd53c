"""ONNX: ``export`` (export + check + verify + count), ``runtime`` (ONNX Runtime sessions and
verification against PyTorch), ``counting`` (normalization ops in a graph)."""

from .counting import NORM_OP_TYPES, count_norm_ops
from .export import EXTERNAL_DATA_THRESHOLD, ExportReport, export_onnx
from .runtime import InputCheck, VerifyReport, load_inputs_file, make_session, optimized_norm_ops, verify_onnx

__all__ = ["export_onnx", "verify_onnx", "count_norm_ops", "optimized_norm_ops", "load_inputs_file",
           "ExportReport", "VerifyReport", "InputCheck", "NORM_OP_TYPES", "make_session",
           "EXTERNAL_DATA_THRESHOLD"]

"""What a ``.pt2`` archive would run when torch loads it, read from its contents without running it.

``torch.export.load`` is not data-only. It unpickles with the full pickler weights marked
``use_pickle``, opaque and torchbind constants, legacy weight files, and sample inputs that the
restricted (weights-only) unpickler refuses (it retries with the full one); it loads AOTInductor
shared libraries; pytree contexts may name modules it imports (``defaultdict`` factories, enums);
shape expressions go through ``sympy.sympify`` (``eval``); and ``ExportedProgram.module()``
``exec``\\ s the archive's ``guards_code``. This module reads the archive's JSON and its sample
inputs (weights-only) and lists each such part, so the loader refuses them without trust. Names
are checked too: FX pastes parameter and buffer paths into the Python source of the module
``ExportedProgram.module()`` builds (``getattr(self, "<name>")``, unescaped), so a quote in a
weight's name is code. Plain archives written by ``torch.export.save`` of ordinary models contain
none of them.
"""

from __future__ import annotations

import ast
import io
import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator

import torch

from .errors import NormSurgeonError, one_line

# Characters a name may have where torch pastes it into generated Python source (guards, input paths).
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]*$")
_IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# Attributes guard code may call on an input (what torch's guards use), and on ``math``.
_GUARD_METHODS = {"size", "stride", "storage_offset", "dim", "numel"}
_GUARD_NAMES = {"L", "max", "min", "abs", "int", "float", "bool", "round", "math", "inf"}
_SAFE_PYTREE_FACTORY_MODULES = {"builtins", "collections"}


@dataclass
class ArchiveReport:
    """``needs_trust``: each part that would run code from the file (empty for a plain archive);
    ``pytree_modules``: modules that define the archive's output types (transformers only, unless
    trusted) and must be imported first so torch knows them."""

    needs_trust: list[str] = field(default_factory=list)
    pytree_modules: set[str] = field(default_factory=set)
    foreign_modules: set[str] = field(default_factory=set)


def check_archive(fh: BinaryIO, where: str) -> ArchiveReport:
    """Read ``fh`` (an open ``.pt2``) without unpickling anything beyond tensors; see the module docstring."""
    from torch.export.pt2_archive import constants as C

    report = ArchiveReport()
    try:
        reader = torch._C.PyTorchFileReader(fh)
        names = list(reader.get_all_records())
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"{where}: not a readable torch.export archive: {one_line(e)}") from e
    fh.seek(0)
    if C.ARCHIVE_FORMAT_PATH not in names:
        # torch's fallback for archives of torch <= 2.7: every part is a pickle it may fully unpickle
        report.needs_trust.append("it is in the torch.export format of torch 2.7 and older, whose parts are "
                                  "pickles (re-save it with this torch)")
        return report

    def read(name: str) -> bytes:
        return reader.get_record(name)

    for name in names:
        if name.startswith((C.AOTINDUCTOR_DIR, C.EXECUTORCH_DIR, C.MTIA_DIR, C.XL_MODEL_WEIGHTS_DIR)):
            report.needs_trust.append(f"it holds compiled code ({name}), which loading runs")
            break
    models = [n[len(C.MODELS_DIR):-len(".json")] for n in names
              if n.startswith(C.MODELS_DIR) and n.endswith(".json")]
    for model in models:
        for legacy in (f"{C.WEIGHTS_DIR}{model}.pt", f"{C.CONSTANTS_DIR}{model}.pt"):
            if legacy in names:
                report.needs_trust.append(f"its {legacy} is a pickle (the legacy layout)")
        _check_payloads(read, names, C.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model), "weight", report)
        _check_payloads(read, names, C.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model), "constant", report)
        sample = C.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
        if sample in names:
            _check_sample_inputs(read(sample), report)
        try:
            program = json.loads(read(f"{C.MODELS_DIR}{model}.json"))
        except ValueError as e:
            raise NormSurgeonError(f"{where}: not a readable torch.export archive: {one_line(e)}") from e
        _check_program(program, report)
    return report


def _check_payloads(read, names: list[str], config_file: str, kind: str, report: ArchiveReport) -> None:
    from torch.export.pt2_archive import constants as C

    if config_file not in names:
        return
    try:
        config = json.loads(read(config_file)).get("config") or {}
    except (ValueError, AttributeError):
        report.needs_trust.append(f"its {config_file} is not the JSON torch writes")
        return
    for fqn, meta in config.items():
        meta = meta if isinstance(meta, dict) else {}
        if not _SAFE_NAME.match(fqn):
            report.needs_trust.append(f"its {kind} {fqn[:60]!r} has a name with characters that torch would paste "
                                      "into generated code")
        path = str(meta.get("path_name", ""))
        if meta.get("use_pickle"):
            report.needs_trust.append(f"its {kind} {fqn!r} is stored as a pickle (use_pickle)")
        elif kind == "constant" and not path.startswith(C.TENSOR_CONSTANT_FILENAME_PREFIX):
            report.needs_trust.append(f"its constant {fqn!r} is a pickled object ({path})")


def _check_sample_inputs(data: bytes, report: ArchiveReport) -> None:
    if not data:
        return
    try:  # the restricted unpickler: tensors and plain containers only, nothing runs
        with warnings.catch_warnings():  # its complaints about the file are the refusal below
            warnings.simplefilter("ignore")
            inputs = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001
        report.needs_trust.append(f"its sample inputs hold pickled objects beyond tensors ({one_line(e, limit=120)})")
        return
    for key in _dict_keys(inputs):
        if not (isinstance(key, str) and _SAFE_NAME.match(key)):
            report.needs_trust.append(f"its sample inputs name an input {key!r} that torch would paste into code")
            return


def _dict_keys(obj: Any) -> Iterator[Any]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _dict_keys(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _dict_keys(v)


def _check_program(program: Any, report: ArchiveReport) -> None:
    for guard in (program.get("guards_code") or []) if isinstance(program, dict) else []:
        if not safe_guard(guard):
            report.needs_trust.append(f"its guards_code {str(guard)[:80]!r} is not a plain shape check (torch "
                                      "runs it as Python code)")
    bad_name = None
    for key, value in _walk(program):
        if (key.endswith("_name") or key in ("name", "fqn")) and isinstance(value, str) \
                and not _SAFE_NAME.match(value) and bad_name is None:
            bad_name = value  # FX pastes parameter/buffer paths into the source of the module it builds
            report.needs_trust.append(f"it names {key} {value[:60]!r}, with characters that torch would paste "
                                      "into generated code")
        if key == "expr_str" and not safe_sym_expr(value):
            report.needs_trust.append(f"its shape expression {str(value)[:80]!r} is not a plain sympy expression "
                                      "(torch evaluates it)")
        elif key in ("in_spec", "out_spec") and isinstance(value, str) and value:
            _check_treespec(value, report)


def _walk(obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def _check_treespec(text: str, report: ArchiveReport) -> None:
    from torch.utils._pytree import SERIALIZED_TYPE_TO_PYTHON_TYPE

    try:
        _, spec = json.loads(text)
    except (ValueError, TypeError):
        report.needs_trust.append("its pytree spec is not the JSON torch writes")
        return
    stack = [spec]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        stack.extend(node.get("children_spec") or [])
        type_name = node.get("type")
        context = node.get("context")
        if isinstance(context, str):
            try:
                ctx = json.loads(context)
            except ValueError:
                ctx = None
            for key, value in _walk(ctx):
                if key == "__enum__":
                    report.needs_trust.append("its pytree spec names an enum, which torch imports")
            if type_name == "collections.defaultdict" and isinstance(ctx, dict) \
                    and ctx.get("default_factory_module") not in _SAFE_PYTREE_FACTORY_MODULES:
                report.needs_trust.append(f"its pytree spec names a defaultdict factory in "
                                          f"{ctx.get('default_factory_module')!r}, which torch imports")
            for s in _strings(ctx):
                if not _SAFE_NAME.match(s):
                    report.needs_trust.append(f"its pytree spec names a key {s[:40]!r} that torch would paste into code")
                    break
        if not isinstance(type_name, str) or type_name in SERIALIZED_TYPE_TO_PYTHON_TYPE:
            continue
        module = type_name.rpartition(".")[0]
        if module == "transformers" or module.startswith("transformers."):
            report.pytree_modules.add(module)
        else:
            report.foreign_modules.add(module)
            report.needs_trust.append(f"its inputs/outputs are of the pytree type {type_name}, defined outside "
                                      f"torch and transformers: loading it imports {module}")


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


# --- expressions torch turns into code ------------------------------------------------------------

def _sympy_callables() -> set[str]:
    """Names a shape expression may call: sympy's symbolic classes and torch's sympy functions."""
    import sympy
    import torch.utils._sympy.functions as F

    names = set()
    for mod in (sympy, F):
        for name in dir(mod):
            obj = getattr(mod, name, None)
            if not name.startswith("_") and isinstance(obj, type) and issubclass(obj, sympy.Basic):
                names.add(name)
    return names


_SYMPY_CALLABLES: set[str] | None = None


def safe_sym_expr(text: Any) -> bool:
    """``text`` is an expression of symbols, numbers, operators and symbolic constructors only
    (``Mul(Integer(2), Symbol('s0', positive=True))``, ``s0 + 1``): what ``sympify`` evaluates safely."""
    global _SYMPY_CALLABLES
    if not isinstance(text, str) or any(c in text for c in "\\\n#;"):
        return False
    if _SYMPY_CALLABLES is None:
        _SYMPY_CALLABLES = _sympy_callables()
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLABLES):
                return False
            if any(kw.arg is None or not isinstance(kw.value, ast.Constant) for kw in node.keywords):
                return False
        elif isinstance(node, ast.Name):
            if not _IDENT.match(node.id):
                return False
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not _IDENT.match(node.value):
                return False
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.keyword,
                                   ast.operator, ast.unaryop, ast.cmpop, ast.boolop, ast.Load)):
            return False
    return True


def safe_guard(text: Any) -> bool:
    """``text`` is a shape check on the inputs (``L['x'].size()[0] == 2``, ``max(1, ...)``), nothing else:
    torch pastes it into source it executes."""
    if not isinstance(text, str) or any(c in text for c in "\\\n\r\"#;"):
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            ok = (isinstance(f, ast.Name) and f.id in _GUARD_NAMES) or \
                 (isinstance(f, ast.Attribute) and (f.attr in _GUARD_METHODS or
                                                    (isinstance(f.value, ast.Name) and f.value.id == "math")))
            if not ok or node.keywords:
                return False
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("_") or not (node.attr in _GUARD_METHODS or
                                                 (isinstance(node.value, ast.Name) and node.value.id == "math")):
                return False
        elif isinstance(node, ast.Name):
            if node.id not in _GUARD_NAMES:
                return False
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not _SAFE_NAME.match(node.value):
                return False
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.Subscript,
                                   ast.operator, ast.unaryop, ast.cmpop, ast.boolop, ast.Load)):
            return False
    return True

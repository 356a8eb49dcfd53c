"""``fold(DIR, affine=True, stream=True, output=OUT/)``: the norm-affine fold of a transformers directory
without loading the model, shard by shard, so a checkpoint larger than memory folds in about one
layer's weights.

1. **plan on a twin** (``twin``): the directory's class at tiny widths, same layers, so the same
   parameter names. Its graph is captured and ``passes.norm_affine`` matches and checks every norm
   (γ/β, readers, layouts, untie): the same refusals as the in-memory fold. The plan is **proven** by the
   normal verified fold of the twin (``passes.fold.fold(affine=True)``): a site the twin's fold did not
   keep is not streamed.
2. **map the plan onto the checkpoint**: every twin parameter must be in the directory under its name
   (any one name of a tied group), with the same rank; per site, γ/β of one width H, readers reading
   H, biases of their output size.
3. **stream** (files: ``shard_files``): tensors are read a chunk at a time (``safe_open``), readers folded
   in float64 row chunks and cast
   back to their stored dtype; γ becomes 1 (0 for ``1 + w`` norms), β 0; every other tensor is copied
   through. Output shards of bounded size are written with safetensors' writer, with their index,
   config.json (``tie_word_embeddings`` false when untied) and the small non-weight files, into a
   temporary directory placed atomically (``saving``).
4. **check per site on the real weights**: a few random normalized rows n; reader(γ⊙n + β) with the
   original tensors against reader'(n) with the folded ones, float64 arithmetic on the stored values,
   max relative error against ``verify.TOLERANCE`` of the stored dtype. A site that fails keeps its
   original tensors and is reported rolled back. The whole real model is never run: the report says so.

A site that would need a new bias (β into a ``bias=False`` reader) is skipped: config.json cannot
describe the bias, and the output is a plain transformers directory.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import NormSurgeonError
from .report import Action, FoldActions, Table, fmt_float
from .shard_files import Checkpoint, ShardWriter, check_written, copy_small_files

CHUNK_BYTES = 16 << 20  # float64 working set of one reader chunk
CHECK_ROWS = 8
DEFAULT_MAX_SHARD_MB = 256


@dataclass
class PlannedReader:
    path: str
    weight: str  # its name in the model (lm_head.weight), maybe not the checkpoint's (untied: the embedding's)
    layout: str  # out_in | in_out
    bias: str | None = None
    untie: bool = False
    aliases: list[str] = field(default_factory=list)  # every name of its weight in the model (tied: several)
    source: str = ""  # the checkpoint's name of its weight (``map_plan``)

    @property
    def target(self) -> str:
        """The name its folded weight is written under: its own when untied, else the checkpoint's."""
        return self.weight if self.untie else self.source


@dataclass
class PlannedSite:
    norm: str
    kind: str
    gamma: str | None
    beta: str | None
    one_plus: bool
    readers: list[PlannedReader]

    @property
    def into(self) -> list[str]:
        return [r.path for r in self.readers]

    def tensors(self) -> list[str]:
        """Every name the site writes."""
        names = [self.gamma, self.beta, *[t for r in self.readers for t in (r.target, r.bias)]]
        return list(dict.fromkeys(t for t in names if t is not None))


@dataclass
class Plan:
    cls: str
    sites: list[PlannedSite] = field(default_factory=list)
    skipped: list[Action] = field(default_factory=list)
    aliases: list[list[str]] = field(default_factory=list)  # every tensor of the twin, by all its names
    ranks: dict[str, int] = field(default_factory=dict)
    twin: dict = field(default_factory=dict)  # what the twin was and how its fold verified


@dataclass
class StreamReport(FoldActions):
    """The streamed fold: per norm folded (into what, local max error) / skipped / rolled back, the twin's
    proof, what was written. FoldReport's JSON keys, plus ``stream``."""

    actions: list[Action] = field(default_factory=list)
    twin: dict = field(default_factory=dict)
    tolerance: float | None = None  # the loosest dtype's; each site is judged at its own readers' dtype
    passed: bool | None = None
    output: str | None = None
    dry_run: bool | None = False
    shards: int = 0
    copied: int = 0
    capture: str = "tiny twin"

    @property
    def affine_actions(self) -> list[Action]:
        return self.actions

    def max_local_error(self) -> float | None:
        errs = [a.detail["max_rel_error"] for a in self.folded if a.detail.get("max_rel_error") is not None]
        return max(errs) if errs else None

    def summary(self) -> str:
        t = self.twin
        if not t.get("passed"):
            return (f"not streamed: the verified fold of the tiny twin of {t.get('class')} failed (max rel error "
                    f"{fmt_float(t.get('max_rel_error'))}, tolerance {t.get('tolerance')}), so its plan is not proven")
        text = (f"streamed: folded the affine of {len(self.folded)} of {len(self.actions)} LayerNorm/RMSNorm sites")
        untied = sorted({p for a in self.folded for p in a.detail.get("untied", [])})
        if untied:
            text += f"; untied {', '.join(untied)}"
        if self.rolled_back:
            text += f"; {len(self.rolled_back)} rolled back"
        text += (f"; plan proven on a tiny twin of {t.get('class')} ({t.get('folded')} folds verified, max rel error "
                 f"{fmt_float(t.get('max_rel_error'))})")
        if self.folded:
            text += (f"; every folded site checked on the real weights (max local rel error "
                     f"{fmt_float(self.max_local_error())}, tolerance {self.tolerance:g})")
        return text + "; the whole real model was not run"

    def to_json(self) -> dict:
        def extra(a: Action) -> dict:
            return {"kind": a.detail.get("kind"), **{k: a.detail[k] for k in ("untied", "max_rel_error")
                                                      if k in a.detail}}
        return {
            "capture": self.capture,
            "folded": [{"norm": a.path, "into": a.detail["into"], "position": "after", "via": [], **extra(a)}
                       for a in self.folded],
            "skipped": [{"norm": a.path, "reason": a.reason, "rolled_back": a.kind == "rolled_back", **extra(a)}
                        for a in self.skipped],
            "verify": {"passed": self.passed, "tolerance": self.tolerance, "max_rel_error": self.max_local_error(),
                       "local": True, "whole_model_run": False},
            "summary": {"batchnorms": 0, "norm_affines": len(self.actions), "folded": len(self.folded),
                        "skipped": len(self.skipped) - len(self.rolled_back), "rolled_back": len(self.rolled_back)},
            "stream": {"twin": self.twin, "shards": self.shards, "copied_tensors": self.copied,
                       "whole_model_run": False},
            "output": self.output, "dry_run": self.dry_run,
        }

    def tables(self) -> list[Table]:
        rows = []
        for a in self.actions:
            if a.kind == "folded":
                rows.append([a.path, "folded", fmt_float(a.detail.get("max_rel_error")), ", ".join(a.detail["into"])])
            else:
                rows.append([a.path, a.kind.replace("_", " "), fmt_float(a.detail.get("max_rel_error")), a.reason])
        table = Table(f"Norm folding, streamed (plan: {self.capture})", ["norm", "result", "local error",
                                                                          "into / reason"], rows)
        table.notes.append(self.summary())
        return [table]


# --- the plan from the twin ------------------------------------------------------------------------

def plan_from_twin(config: Any, cls: type, *, untie: bool = False) -> Plan:
    """Match and check every norm of the twin (``norm_affine``), then prove the plan with the twin's
    verified fold: only sites that fold there are planned."""
    from . import twin as _twin
    from .inputs import inputs_from_hf_config
    from .passes import norm_affine
    from .passes.fold import fold as fold_pass
    from .passes.stream import tensor_aliases
    from .zoo_llm import randomize_norms

    model = _twin.build(config, cls)
    randomize_norms(model)
    ci = inputs_from_hf_config(model.config)
    if ci is None:
        raise NormSurgeonError(f"{cls.__name__}: cannot derive inputs for its tiny twin")
    plan = Plan(cls.__name__)
    plan.aliases, plan.ranks = twin_names(model)
    aliases = tensor_aliases(model)
    graph = capture_twin(model, ci, cls)
    planned = []
    for site in norm_affine.match(model, graph):
        reason = norm_affine.check(site, model, graph, untie=untie)
        if reason is None and site.create_bias:
            reason = (f"{', '.join(r.path for r in site.create_bias)} would need a new bias for β, which config.json "
                      "cannot describe (the in-memory fold writes a recipe directory for it)")
        if reason is not None:
            plan.skipped.append(Action("skipped", site.norm, {"kind": site.kind, "affine": True}, reason))
            continue
        untied = {id(r) for r in site.untie}
        readers = [PlannedReader(r.path, r.weight.name, r.layout, r.bias.name if r.bias is not None else None,
                                 id(r) in untied, aliases.get(id(r.weight.get(model)), [r.weight.name]))
                   for r in site.readers]
        aff = site.affine
        planned.append(PlannedSite(site.norm, site.kind, aff.weight.name if aff.weight is not None else None,
                                   aff.bias.name if aff.bias is not None else None, aff.one_plus, readers))
    # the proof: the normal verified fold of the same twin folds exactly these sites
    # (in place, on the graph just captured: the twin is ours, and a second capture of its layers costs seconds)
    _, report = fold_pass(model, ci, affine=True, untie=untie, graph=graph, inplace=True)
    kept = {a.path for a in report.affine_actions if a.kind == "folded"}
    why = {a.path: a.reason for a in report.affine_actions if a.kind != "folded"}
    for s in planned:
        if s.norm in kept and report.passed:
            plan.sites.append(s)
        else:
            reason = why.get(s.norm) or (report.verify_error or "the twin's fold failed verification")
            plan.skipped.append(Action("skipped", s.norm, {"kind": s.kind, "affine": True},
                                       f"the twin's verified fold did not keep it: {reason}"))
    err = report.verify.max_rel_error if report.verify is not None else None
    plan.twin = {"class": cls.__name__, "layers": getattr(model.config, "num_hidden_layers", None),
                 "hidden_size": getattr(model.config, "hidden_size", None), "folded": len(kept),
                 "max_rel_error": err if err is None or math.isfinite(err) else None,
                 "tolerance": report.tolerance, "passed": report.passed}
    return plan


def twin_names(model: torch.nn.Module) -> tuple[list[list[str]], dict[str, int]]:
    """Every saved tensor of the twin by all its names (a tied group: several), and every name's rank."""
    names: dict[int, list[str]] = {}
    ranks = {}
    for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(n)
        ranks[n] = t.dim()
    persistent = set(model.state_dict().keys())
    return [ns for ns in names.values() if any(n in persistent for n in ns)], ranks


def capture_twin(model: torch.nn.Module, ci: Any, cls: type) -> Any:
    from .graph import capture, without_kv_cache

    try:
        with without_kv_cache(model):
            # every layer of the twin, as the checkpoint has: identical ones are exported once (graph.blocks)
            return capture(model, ci, repeat_blocks=True)
    except NormSurgeonError as e:
        raise NormSurgeonError(f"{cls.__name__}: its tiny twin cannot be captured ({e.template})") from None


def check_names(aliases: list[list[str]], ranks: dict[str, int], ckpt: Checkpoint, cls: str) -> None:
    """Refuse a checkpoint whose tensor names are not the class's (every twin tensor, under one of its
    names, with its rank): the twin's plan names tensors, and a guessed mapping is not a plan."""
    have = set(ckpt.names)
    for group in aliases:
        if not any(n in have for n in group):
            raise NormSurgeonError(f"the checkpoint has no tensor {group[0]}, a parameter of {cls}: its "
                                   "names are not the class's, so the twin's plan cannot be mapped onto it")
        for n in group:
            if n in have and len(ckpt.shape[n]) != ranks[n]:
                raise NormSurgeonError(f"the checkpoint's {n} has rank {len(ckpt.shape[n])}, {cls}'s has {ranks[n]}")


def map_plan(plan: Plan, ckpt: Checkpoint) -> None:
    """Bind the twin's names to the checkpoint's tensors; refuse a checkpoint whose names are not the
    class's, skip a site whose tensors do not have the roles the plan gives them."""
    check_names(plan.aliases, plan.ranks, ckpt, plan.cls)
    good = []
    for s in plan.sites:
        reason = _roles(s, ckpt)
        if reason is None:
            good.append(s)
        else:
            plan.skipped.append(Action("skipped", s.norm, {"kind": s.kind, "affine": True}, reason))
    plan.sites = good


def _same_tensor(ckpt: Checkpoint, a: str, b: str) -> bool:
    """Whether two stored tensors hold the same values, compared a block of rows at a time."""
    if ckpt.shape[a] != ckpt.shape[b] or ckpt.dtype[a] != ckpt.dtype[b]:
        return False
    rows = ckpt.shape[a][0] if ckpt.shape[a] else 0
    if not rows:
        return torch.equal(ckpt.get(a), ckpt.get(b))
    step = ckpt._step(a)
    return all(torch.equal(ckpt.rows(a, i, min(rows, i + step)), ckpt.rows(b, i, min(rows, i + step)))
               for i in range(0, rows, step))


def _roles(s: PlannedSite, ckpt: Checkpoint) -> str | None:
    width = None
    for t in (s.gamma, s.beta):
        if t is not None:
            shape = ckpt.shape[t]
            if len(shape) != 1 or (width is not None and shape[0] != width):
                return f"the checkpoint's {t} has shape {list(shape)}, not the norm's width"
            width = shape[0]
    for r in s.readers:
        names = [r.weight] if r.weight in ckpt.shape else [n for n in r.aliases if n in ckpt.shape]
        if not names:
            return f"the checkpoint has no tensor for {r.weight}"
        r.source = names[0]
        stored = [n for n in dict.fromkeys([r.weight, *r.aliases]) if n in ckpt.shape]
        differs = next((n for n in stored[1:] if not _same_tensor(ckpt, stored[0], n)), None)
        if differs is not None:
            # tied in the model: transformers loads one of the two and ties the other to it, so folding
            # whichever copy we picked could fold values the model never had
            return (f"the checkpoint stores {stored[0]} and its tied {differs} with different values; "
                    "which one the model uses is transformers' choice, not the file's")
        shape = ckpt.shape[r.source]
        if len(shape) != 2 or shape[1 if r.layout == "out_in" else 0] != width:
            return f"the checkpoint's {r.source} has shape {list(shape)}: it does not read width {width}"
        if not ckpt.dtype[r.source].is_floating_point:
            return f"the checkpoint's {r.source} is {ckpt.dtype[r.source]}, not a float tensor"
        if r.bias is not None:
            out = shape[0 if r.layout == "out_in" else 1]
            if r.bias not in ckpt.shape or ckpt.shape[r.bias] != (out,):
                return f"the checkpoint's bias {r.bias} is not a vector of {out}"
    return None


# --- folding one site, checked ----------------------------------------------------------------------

@dataclass
class ReaderCheck:
    """reader(γ⊙n + β) with the original tensors against reader'(n) with the folded ones, accumulated
    chunk by chunk in float64 over the stored values."""

    a: torch.Tensor  # γ⊙n + β, float64
    n: torch.Tensor  # n, float64
    layout: str
    y_ref: torch.Tensor | None = None
    y_new: torch.Tensor | None = None

    def add(self, start: int, stop: int, w: torch.Tensor, w_new: torch.Tensor, out: int) -> None:
        if self.y_ref is None:
            self.y_ref = torch.zeros(self.n.shape[0], out, dtype=torch.float64)
            self.y_new = torch.zeros_like(self.y_ref)
        w, w_new = w.double(), w_new.double()
        if self.layout == "out_in":
            self.y_ref[:, start:stop] += self.a @ w.T
            self.y_new[:, start:stop] += self.n @ w_new.T
        else:
            self.y_ref += self.a[:, start:stop] @ w
            self.y_new += self.n[:, start:stop] @ w_new

    def error(self, b: torch.Tensor | None, b_new: torch.Tensor | None) -> float:
        ref = self.y_ref + (b.double() if b is not None else 0)
        new = self.y_new + (b_new.double() if b_new is not None else 0)
        if not (torch.isfinite(new).all() and torch.isfinite(ref).all()):
            return math.inf
        scale = ref.abs().max().item()
        diff = (ref - new).abs().max().item()
        return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def fold_reader(ckpt: Checkpoint, r: PlannedReader, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                check: ReaderCheck) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """One reader folded in row chunks: (W', b', the local relative error)."""
    from .norm_math import fold_into_reader

    shape, dtype = ckpt.shape[r.source], ckpt.dtype[r.source]
    rows, cols = shape
    step = max(1, CHUNK_BYTES // (8 * cols))
    new_w = torch.empty(shape, dtype=dtype)
    b = ckpt.get(r.bias) if r.bias is not None else None
    out = rows if r.layout == "out_in" else cols
    shift = torch.zeros(out, dtype=torch.float64) if beta is not None else None
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        w = ckpt.rows(r.source, start, stop)
        if r.layout == "out_in":
            w2, sh = fold_into_reader(w.double(), None, gamma, beta, "out_in")
            if shift is not None:
                shift[start:stop] = sh
        else:
            w2, sh = fold_into_reader(w.double(), None, gamma[start:stop] if gamma is not None else None,
                                      beta[start:stop] if beta is not None else None, "in_out")
            if shift is not None:
                shift += sh
        new_w[start:stop] = w2.to(dtype)
        check.add(start, stop, w, new_w[start:stop], out)
        del w, w2
    b_new = None
    if b is not None:
        b_new = (b.double() + shift).to(b.dtype) if shift is not None else b.clone()
    return new_w, b_new, check.error(b, b_new)


def normalized_rows(width: int, kind: str, seed: int) -> torch.Tensor:
    """A few random rows x (float32) as the norm normalizes them (mean removed for a LayerNorm, unit RMS)."""
    x = torch.randn(CHECK_ROWS, width, generator=torch.Generator().manual_seed(seed)).double()
    if kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return x / x.pow(2).mean(-1, keepdim=True).sqrt()


def fold_site(ckpt: Checkpoint, s: PlannedSite, seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """The site's new tensors (readers' weights/biases, γ = 1 / w = 0, β = 0) and its local max error."""
    g = ckpt.get(s.gamma) if s.gamma is not None else None
    bt = ckpt.get(s.beta) if s.beta is not None else None
    gamma = g.double() + (1.0 if s.one_plus else 0.0) if g is not None else None
    beta = bt.double() if bt is not None else None
    width = (g if g is not None else bt).shape[0]
    n = normalized_rows(width, s.kind, seed)
    a = n * (gamma if gamma is not None else 1.0) + (beta if beta is not None else 0.0)
    out: dict[str, torch.Tensor] = {}
    worst = 0.0
    for r in s.readers:
        w, b, err = fold_reader(ckpt, r, gamma, beta, ReaderCheck(a, n, r.layout))
        worst = max(worst, err)
        out[r.target] = w
        if b is not None:
            out[r.bias] = b
    if g is not None:
        out[s.gamma] = torch.full_like(g, 0.0 if s.one_plus else 1.0)
    if bt is not None:
        out[s.beta] = torch.zeros_like(bt)
    return out, worst


# --- the whole command -------------------------------------------------------------------------------

def check_call(model: Any, output: Any, *, force: bool, max_shard_mb: Any) -> tuple[Path, Path]:
    """What every streamed command checks before any work: the source directory, the output (never
    the input, an existing one only with ``force``) and the shard size. Returns (source, output)."""
    src = check_source(model)
    out = check_output(src, output, force=force)
    if not isinstance(max_shard_mb, (int, float)) or isinstance(max_shard_mb, bool) or not max_shard_mb > 0:
        raise NormSurgeonError(f"`max_shard_mb` must be a positive number of MiB, not {max_shard_mb!r}")
    return src, out


def check_source(path: Any) -> Path:
    src = Path(os.fspath(path))
    if not src.is_dir() or not (src / "config.json").is_file():
        raise NormSurgeonError(f"{src}: `stream=True` reads a transformers directory (config.json and safetensors "
                               "weights)")
    return src


def check_output(src: Path, output: Any, *, force: bool) -> Path:
    from .replay import is_dir_output
    from .saving import guard_inputs

    if output is None:
        raise NormSurgeonError("`stream=True` writes a new directory: pass `output=DIR/`")
    out = Path(os.fspath(output))
    if not is_dir_output(output):
        raise NormSurgeonError(f"`output` {output}: `stream=True` writes a directory (DIR/), not a file")
    guard_inputs(out, [src])
    real, inside = src.resolve(), out.resolve()
    if inside == real or real in inside.parents:
        raise NormSurgeonError(f"`output` {output} lies inside the input directory {src}; normsurgeon never writes "
                               "into its inputs (choose another output path)")
    if out.exists():
        if not out.is_dir():
            raise NormSurgeonError(f"`output` {output}: {out} is a file, not a directory")
        if any(out.iterdir()):
            if not force:
                raise NormSurgeonError(f"`output` {output}: {out} is not empty; pass `force=True` to replace it")
            if not (out / "config.json").is_file():
                raise NormSurgeonError(f"`output` {output}: {out} holds other files, not a model directory; "
                                       "choose a new or empty directory")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise NormSurgeonError(f"`output` {output}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise NormSurgeonError(f"`output` {output}: directory {parent} is not writable")
    return out


def fold_dir(model: Any, *, output: Any, force: bool = False, untie: bool = False,
             max_shard_mb: float = DEFAULT_MAX_SHARD_MB, seed: int = 0) -> tuple[Path, StreamReport]:
    """Fold the norm affines of the transformers directory ``model`` into ``output`` shard by shard;
    see the module docstring. Returns (the output directory, the report)."""
    from .saving import place_dir, temp_dir
    from .verify import TOLERANCE

    src, out = check_call(model, output, force=force, max_shard_mb=max_shard_mb)
    from . import twin as _twin

    config, cls = _twin.read_config(src)
    ckpt = Checkpoint(src)
    plan = plan_from_twin(config, cls, untie=untie)
    gc.collect()  # the twin, its graph and programs: before the real tensors arrive
    report = StreamReport(twin=plan.twin, capture=f"tiny twin of {plan.cls}")
    if not plan.twin.get("passed"):
        report.passed = False
        report.actions = plan.skipped
        return out, report
    map_plan(plan, ckpt)
    by_tensor = {t: s for s in plan.sites for t in s.tensors() if t in ckpt.file}
    dtypes = {ckpt.dtype[r.source] for s in plan.sites for r in s.readers}
    report.tolerance = max((TOLERANCE.get(d, TOLERANCE[torch.float32])[0] for d in dtypes), default=None)
    actions: dict[str, Action] = {a.path: a for a in plan.skipped}
    expect = {n: (ckpt.shape[n], ckpt.dtype[n]) for n in ckpt.names}
    tmp = temp_dir(out)
    untied_any = False
    try:
        writer = ShardWriter(tmp, int(max_shard_mb * 2 ** 20))
        done: set[str] = set()
        for i, name in enumerate(ckpt.names):
            if name in done:
                continue
            s = by_tensor.get(name)
            if s is None:
                writer.add(name, ckpt.get(name))
                done.add(name)
                report.copied += 1
                continue
            writer.make_room(sum(ckpt.nbytes(r.source) for r in s.readers))  # before the site's tensors exist
            tensors, err = fold_site(ckpt, s, seed + i)
            # each site at its own readers' dtype: a float32 reader of a mixed checkpoint gets float32's
            site_tol = max(TOLERANCE.get(ckpt.dtype[r.source], TOLERANCE[torch.float32])[0] for r in s.readers)
            action = _judge(s, err, site_tol)
            actions[s.norm] = action
            if action.kind == "folded":
                for r in s.readers:
                    if r.untie:
                        untied_any = True
                        expect[r.weight] = (ckpt.shape[r.source], ckpt.dtype[r.source])
            else:  # the original tensors, as they were (an untied reader's source is copied through anyway)
                del tensors
                tensors = {t: ckpt.get(t) for t in s.tensors() if t in ckpt.file}
            for t, v in tensors.items():
                writer.add(t, v)
                done.add(t)
            del tensors
        report.shards = writer.finish()
        copy_small_files(src, tmp, untied_any)
        check_written(tmp, expect)
        place_dir(tmp, out, force=force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    report.actions = sorted(actions.values(), key=lambda a: _natural(a.path))
    report.passed = True
    report.output = str(out)
    return out, report


def _judge(s: PlannedSite, err: float, tolerance: float) -> Action:
    detail = {"kind": s.kind, "affine": True, "into": s.into, "max_rel_error": err if math.isfinite(err) else None}
    if err <= tolerance:
        untied = [r.path for r in s.readers if r.untie]
        if untied:
            detail["untied"] = untied
        return Action("folded", s.norm, detail)
    why = "a non-finite amount" if not math.isfinite(err) else f"{err:.2e}"
    return Action("rolled_back", s.norm, detail,
                  f"on random normalized rows the folded readers' outputs differ from the original ones by {why} "
                  f"(relative; tolerance {tolerance:g}): its original tensors are written")


def _natural(path: str) -> tuple:
    import re

    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", path))

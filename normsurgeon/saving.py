"""Write outputs without ever losing an input.

Every output (``-o`` of fold, convert, calibrate, export; ``save_model``; recipe directories) goes
through here:

- **inputs are never touched**: ``guard_inputs`` refuses an output that is, holds, or lies inside a
  file or directory the command reads (the model, ``--weights``, ``--inputs``, ``--data``), compared
  by resolved path and by ``os.path.samefile`` (symlinks and hard links), ``--force`` or not;
- **atomic, and one writer wins**: the result is written under a temporary name beside the output
  and moved into place at the end; without ``force`` the final step creates the output exclusively
  (``os.link`` for a file, ``os.rename`` onto a missing or empty directory for a directory), so of two
  runs writing one output, the second fails with "exists" instead of silently replacing the first;
- **no litter**: temporary names are ``.normsurgeon-tmp-<pid>-<random>-<name>``; a killed run's
  leftovers (their pid is no longer running) are removed by the next write into that directory;
- **the umask decides the mode**: temporary files and directories are created with ``os.open``/
  ``os.mkdir`` at 0666/0777 (the umask applies), never ``mkstemp``/``mkdtemp`` (0600/0700).
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .errors import NormSurgeonError, one_line
from .inputs import as_call_args
from .quiet import quiet_torch

TMP_PREFIX = ".normsurgeon-tmp-"
_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-")


# --- inputs ---------------------------------------------------------------------------------------

def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def guard_inputs(out: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse ``out`` when writing it could delete or overwrite a file the command reads.

    Only an existing output is replaced, so only an existing one can clash: it may not be an input
    (same path, symlink or hard link), lie inside an input directory, or (a directory, replaced as a
    whole) hold an input. ``inputs`` may hold ``None`` and specs that are not paths (``pkg.mod:factory``)."""
    if not out.exists():
        return
    target = out.resolve()
    for src in inputs:
        if src is None or not Path(src).exists():
            continue
        real = Path(src).resolve()
        kind = "directory" if real.is_dir() else "file"
        if target == real or _same(out, Path(src)):
            how = "is"
        elif _inside(target, real):
            how = "lies inside"
        elif out.is_dir() and _inside(real, target):
            how = "holds"
        else:
            continue
        raise NormSurgeonError(f"`output` {out} {how} the input {kind} ({src}); normsurgeon never overwrites its inputs "
                               "(choose another output path)")


def check_output_path(path: str | os.PathLike, *, force: bool = False,
                      inputs: Sequence[str | os.PathLike | None] = (),
                      suffixes: Sequence[str] = (".pt", ".pth", ".pt2")) -> Path:
    """Validate an output file before any work is done, so a bad path fails fast."""
    out = Path(path)
    if suffixes and out.suffix.lower() not in suffixes:
        raise NormSurgeonError(f"`output` {out}: the output must end in {' or '.join(suffixes)}")
    guard_inputs(out, inputs)
    if out.exists() and not force:
        raise NormSurgeonError(f"`output` {out} exists; pass `force=True` to replace it")
    if out.is_dir():
        raise NormSurgeonError(f"`output` {out} is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise NormSurgeonError(f"`output` {out}: {parent} is a file, not a directory")
    if not parent.is_dir():
        raise NormSurgeonError(f"`output` {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise NormSurgeonError(f"`output` {out}: directory {parent} is not writable")
    return out


def check_program_output(out: Path) -> None:
    """A torch.export program (a folded ``.pt2``) is saved as ``.pt2`` only: ``ep.module()`` holds
    local functions, which ``torch.save`` cannot pickle."""
    if out.suffix.lower() != ".pt2":
        raise NormSurgeonError(f"`output` {out}: a torch.export program is saved as .pt2, not {out.suffix}")


# --- temporary names ------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def remove_stale(folder: Path) -> list[Path]:
    """Remove temporary files/directories a killed run left in ``folder`` (its pid no longer runs)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TMP_NAME.match(entry.name)
        if not m or _alive(int(m.group(1))):
            continue
        p = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def temp_path(out: Path, tag: str = "") -> Path:
    """A fresh name beside ``out`` that ``remove_stale`` recognises once this process is gone
    (``out``'s own name last, so its suffix is kept: torch.export.save wants ``.pt2``)."""
    folder = out.parent if str(out.parent) else Path(".")
    return folder / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{tag}-{out.name}"


def temp_file(out: Path) -> Path:
    """Create an empty temporary file beside ``out``, mode 0666 minus the umask."""
    remove_stale(out.parent if str(out.parent) else Path("."))
    tmp = temp_path(out)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return tmp


def temp_dir(out: Path) -> Path:
    """Create an empty temporary directory beside ``out``, mode 0777 minus the umask."""
    remove_stale(out.parent if str(out.parent) else Path("."))
    tmp = temp_path(out)
    os.mkdir(tmp, 0o777)
    return tmp


# --- modes ----------------------------------------------------------------------------------------

def current_umask() -> int:
    """The process umask, read without changing it where the OS says it (Linux: /proc), so other
    threads never see a zero umask."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything in it) the mode a plain ``open``/``mkdir``
    would: writers such as safetensors create their files 0600 whatever the umask."""
    mask = current_umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


# --- moving into place ----------------------------------------------------------------------------

def _appeared(out: Path) -> NormSurgeonError:
    return NormSurgeonError(f"`output` {out} appeared while this run worked (another run wrote it?); nothing replaced "
                            "(pass `force=True` to replace it)")


def place_file(tmp: Path, out: Path, *, force: bool) -> None:
    """Move the finished ``tmp`` to ``out``: replacing it with ``force``, else only if ``out`` still
    does not exist (created exclusively: of two writers, one wins and the other raises)."""
    follow_umask(tmp)
    if force:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise _appeared(out) from None
    except OSError as e:  # a file system without hard links: rename, after a last check
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if out.exists():
            raise _appeared(out) from None
        os.replace(tmp, out)
        return
    os.unlink(tmp)


def place_dir(tmp: Path, out: Path, *, force: bool) -> None:
    """Move the finished directory ``tmp`` to ``out``. Without ``force`` a rename that only succeeds
    onto a missing or empty directory (two writers: one wins); with ``force`` an existing ``out`` is
    moved aside first and deleted only once ``tmp`` is in place."""
    follow_umask(tmp)
    if not (force and out.exists()):
        try:
            os.rename(tmp, out)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise _appeared(out) from None
            raise
        return
    old = temp_path(out, "-old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: Path, write: Callable[[str], None], *, force: bool = True) -> None:
    """Call ``write(tmp_path)`` then move the file into place (``place_file``), so a failure leaves
    nothing half-written and an output another run created meanwhile is not replaced without ``force``."""
    tmp = temp_file(path)
    try:
        write(str(tmp))
        place_file(tmp, path, force=force)
    finally:
        if tmp.exists():
            tmp.unlink()


# --- models ---------------------------------------------------------------------------------------

def save_model(model: torch.nn.Module | torch.export.ExportedProgram, path: str | os.PathLike, *,
               example_inputs: Any = None, force: bool = False, input_path: str | os.PathLike | None = None,
               inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Write ``model`` to ``.pt`` (pickled module) or ``.pt2`` (torch.export archive), atomically; an
    ``ExportedProgram`` (a folded ``.pt2``) is written as it is, to ``.pt2`` only. ``input_path`` and
    ``inputs`` (files the caller read) are never overwritten."""
    out = check_output_path(path, force=force, inputs=[input_path, *inputs])
    if isinstance(model, torch.export.ExportedProgram):
        check_program_output(out)
        _save_pt2(model, out, "", force)
    elif out.suffix.lower() == ".pt2":
        if example_inputs is None:
            raise NormSurgeonError(f"`output` {out}: a .pt2 archive needs example inputs (`input_shapes`)")
        ci = as_call_args(example_inputs)
        try:
            ep = torch.export.export(model.eval(), ci.args, ci.kwargs, strict=False)
        except Exception as e:  # noqa: BLE001
            raise NormSurgeonError(f"`output` {out}: torch.export failed ({one_line(e)}); save as .pt instead") from e
        _save_pt2(ep, out, "; save as .pt instead", force)
    else:
        check_picklable(model, out)
        _store_example_inputs(model)
        atomic_write(out, lambda tmp: torch.save(model, tmp), force=force)
    return out


def check_picklable(model: torch.nn.Module, out: Path) -> None:
    """A ``.pt`` file is the pickled module; torch refuses to pickle parametrized modules (weight_norm
    in Wav2Vec2's positional conv: "only supported through state_dict()"). Say so before any work,
    with the outputs that do hold such a model."""
    from torch.nn.utils import parametrize

    paths = [p for p, m in model.named_modules() if parametrize.is_parametrized(m)]
    if paths:
        more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
        raise NormSurgeonError(
            f"`output` {out}: {paths[0] or 'the model'}{more} is parametrized (torch.nn.utils.parametrize, e.g. "
            "weight_norm), which torch.save cannot pickle; write a recipe directory (`output=DIR/`: weights as "
            "safetensors, the parametrization rebuilt) or a .pt2 archive instead")


def _save_pt2(ep: torch.export.ExportedProgram, out: Path, hint: str, force: bool) -> None:
    def write(tmp: str) -> None:
        torch.export.save(ep, tmp)
        try:  # a file we report as saved must load back
            with quiet_torch():
                torch.export.load(tmp)
        except Exception as e:  # noqa: BLE001
            raise NormSurgeonError(f"`output` {out}: the archive does not load back ({one_line(e)}){hint}") from e

    atomic_write(out, write, force=force)


def _store_example_inputs(model: torch.nn.Module) -> None:
    """A model carrying an ``example_inputs`` closure (a lambda in a factory) cannot be pickled: keep
    the inputs themselves instead (``loading.getattr_inputs`` reads either form back)."""
    ex = model.__dict__.get("example_inputs")
    if ex is None or not callable(ex):
        return
    try:
        pickle.dumps(ex)
    except Exception:  # noqa: BLE001 - lambdas, local functions
        model.example_inputs = ex()

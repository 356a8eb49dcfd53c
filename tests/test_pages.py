"""pages.populate_for_write: a private file mapping's copy-on-write faults taken in one call, values kept."""

import mmap
import resource

import pytest
import torch

from normsurgeon.pages import populate_for_write


def _mapped(tmp_path, name, values):
    path = tmp_path / name
    path.write_bytes(values.numpy().tobytes())
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private, like safetensors' mapping
    return torch.frombuffer(m, dtype=torch.float32), m


def _faults_writing(t):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t.mul_(2)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_writes_after_populate_take_no_page_faults(tmp_path):
    values = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB: 1024 pages
    plain, m1 = _mapped(tmp_path, "a.bin", values)
    populated, m2 = _mapped(tmp_path, "b.bin", values)
    if not populate_for_write(populated):
        pytest.skip("no MADV_POPULATE_WRITE here (Linux 5.14+)")
    assert torch.equal(populated, values)
    assert _faults_writing(plain) > 500  # one copy-on-write fault per page ...
    assert _faults_writing(populated) < 50  # ... taken up front instead
    assert torch.equal(populated, values * 2) and torch.equal(plain, values * 2)
    assert (tmp_path / "b.bin").read_bytes() == values.numpy().tobytes()  # the file is never written
    assert populate_for_write(populated.view(1024, 1024).t()[3:5])  # a strided view: its span is populated
    assert not populate_for_write(torch.empty(0))
    del plain, populated

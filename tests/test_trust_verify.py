"""Issue 16, verification: bad verification input is named as bad input (row 10), and a fold is
not reported passed for sizes the checks never ran (row 11)."""

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from normsurgeon.cli import main
from normsurgeon.errors import NormSurgeonError
from normsurgeon.passes.fold import fold


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def cnn(bad_var=None):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        if bad_var is not None:
            m[1].running_var[2] = bad_var
    return m.eval()


# --- row 10 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, words", [(float("nan"), "NaN/inf"), (float("inf"), "NaN/inf")])
def test_non_finite_inputs_file_is_bad_input(tmp_path, bad, words):
    torch.save(cnn(), tmp_path / "m.pt")
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = bad
    torch.save({"input_0": x}, tmp_path / "x.pt")
    result = run("fold", tmp_path / "m.pt", "--trust", "--input-shape", "2,3,8,8", "--inputs", tmp_path / "x.pt")
    assert result.exit_code == 2, result.output
    assert words in result.output and "x.pt" in result.output
    assert "rolled back" not in result.output


def test_empty_inputs_file_is_bad_input(tmp_path):
    torch.save(cnn(), tmp_path / "m.pt")
    torch.save({"input_0": torch.randn(0, 3, 8, 8)}, tmp_path / "x.pt")
    result = run("fold", tmp_path / "m.pt", "--trust", "--input-shape", "2,3,8,8", "--inputs", tmp_path / "x.pt")
    assert result.exit_code == 2, result.output
    assert "empty" in result.output


def test_non_finite_or_empty_example_inputs_are_refused_by_the_api():
    x = torch.randn(2, 3, 8, 8)
    x[1, 1, 1, 1] = float("nan")
    with pytest.raises(NormSurgeonError, match="NaN/inf"):
        fold(cnn(), (x,))
    with pytest.raises(NormSurgeonError, match="empty"):
        fold(cnn(), (torch.randn(0, 3, 8, 8),))


@pytest.mark.parametrize("bad", [-0.5, float("nan")])
def test_negative_or_nan_running_var_is_a_skip_reason_not_a_rollback(bad):
    folded, report = fold(cnn(bad_var=bad), (torch.randn(2, 3, 8, 8),))
    by_path = {a.path: a for a in report.actions}
    assert by_path["1"].kind == "skipped" and "running_var negative/NaN" in by_path["1"].reason
    text = " ".join(str(a.reason) for a in report.actions) + " " + report.summary()
    assert "not deterministic" not in text
    assert report.passed is False and "NaN/inf" in report.summary()

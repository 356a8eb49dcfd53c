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


# --- row 11 ----------------------------------------------------------------------------------------

class BatchBranch(nn.Module):
    """The conv feeds the BN only for small batches: folding the BN into it changes the big-batch path."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = self.conv(x)
        return y if x.shape[0] > 4 else self.bn(y)


class SizeBranch(BatchBranch):
    def forward(self, x):
        y = self.conv(x)
        return y if x.shape[-1] >= 20 else self.bn(y)


@pytest.mark.parametrize("cls, x", [(BatchBranch, torch.randn(2, 3, 16, 16)), (SizeBranch, torch.randn(2, 3, 16, 16))])
def test_a_branch_the_example_never_takes_is_caught(cls, x):
    torch.manual_seed(0)
    model = cls().eval()
    folded, report = fold(model, (x,))
    assert not report.folded, report.summary()
    assert report.rolled_back and "changed the outputs" in report.rolled_back[0].reason
    # what was checked is said: the example and a larger batch at other spatial sizes
    assert [2, 3, 16, 16] in [s[0] for s in report.verified_shapes]
    assert [8, 3, 20, 20] in [s[0] for s in report.verified_shapes]
    assert "checked at input shapes" in report.tables()[0].notes[-1]


def test_sizes_the_model_rejects_are_not_claimed():
    """A model that only takes 16x16 (a flatten into a Linear): the other input falls back to the
    larger batch alone, and the report lists exactly the shapes that ran."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 14 * 14, 2)).eval()
    folded, report = fold(model, (torch.randn(2, 3, 16, 16),))
    assert report.passed and len(report.folded) == 1
    shapes = [s[0] for s in report.verified_shapes]
    assert [8, 3, 16, 16] in shapes and all(s[2:] == [16, 16] for s in shapes)


def test_negative_running_var_in_a_program_is_a_skip_reason():
    from normsurgeon.passes.fold import fold_program

    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(cnn(bad_var=-0.5), (x,), strict=False)
    _, report = fold_program(ep, (x,))
    by_path = {a.path: a for a in report.actions}
    skipped = [a for a in report.actions if a.kind == "skipped"]
    assert len(skipped) == 1 and "running_var negative/NaN" in skipped[0].reason, by_path
    assert "not deterministic" not in " ".join(str(a.reason) for a in report.actions)

"""``PackedLinear``: oneDNN's packed GEMM for steps of many rows, F.linear below (pipeline/models/packed_linear.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import packed_linear
from pipeline.models.packed_linear import MIN_ROWS, PackedLinear, pack_linears

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="torch has no oneDNN here")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, MIN_ROWS - 1, MIN_ROWS, 100, 2049])
def test_equals_f_linear(rows, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 80, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(rows, 96)
    torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    strided = torch.randn(96, rows).t()  # a transposed view: not contiguous
    torch.testing.assert_close(packed(strided), F.linear(strided, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


def test_which_kernel_runs(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(packed_linear.torch.ops.mkldnn, "_linear_pointwise",
                        lambda *args: calls.append(args[0].shape[0]) or real(*args), raising=False)
    packed = PackedLinear(nn.Linear(8, 4))
    for rows in (1, MIN_ROWS - 1, MIN_ROWS, 40):
        packed(torch.randn(rows, 8))
    packed(torch.randn(2, 40, 8))  # not flat: F.linear
    assert calls == [MIN_ROWS, 40]


def test_pack_linears_keeps_parameters_and_skips_other_dtypes():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4)), nn.Linear(4, 2).double())
    keys = set(model.state_dict())
    weight = model[0].weight
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    assert type(model[3]) is nn.Linear  # float64: left alone
    assert set(model.state_dict()) == keys and model[0].weight is weight  # the same parameters, shared


def test_the_engine_packs_on_cpu_unless_asked_not_to(tiny_checkpoint):
    from pipeline import Pipeline

    def kinds(**options):
        model = Pipeline.from_pretrained(str(tiny_checkpoint), **options).engine.runner.model
        return {type(m) for m in model.modules()} & {nn.Linear, PackedLinear}

    assert kinds() == {PackedLinear}
    assert kinds(pack_linears=False) == {nn.Linear}

"""``PackedLinear`` (pipeline/models/packed_linear.py): the few-row C++ linear up to SMALL_MAX_ROWS rows, oneDNN's
packed GEMM above, each against F.linear; the op the compiled decode step calls; the engine's packing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import packed_linear
from pipeline.models.packed_linear import SMALL_MAX_ROWS, PackedLinear, pack_linears, row_thresholds

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="torch has no oneDNN here")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, SMALL_MAX_ROWS, SMALL_MAX_ROWS + 1, 100, 2049])
@pytest.mark.parametrize("features", [(96, 80), (13, 7), (512, 1029)])  # (in, out): tails of the AVX2 tiles
def test_equals_f_linear(rows, bias, features):
    torch.manual_seed(rows)
    linear = nn.Linear(*features, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(rows, features[0])
    torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    strided = torch.randn(features[0], rows).t()  # a transposed view: not contiguous
    torch.testing.assert_close(packed(strided), F.linear(strided, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


def test_the_few_row_op_is_built_and_checks_its_inputs():
    op = packed_linear.load_small_linear()
    assert op is not None
    with pytest.raises(RuntimeError, match="float32 only"):
        op(torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match=r"x \[M, K\] and weight \[N, K\]"):
        op(torch.randn(2, 8), torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match="bias"):
        op(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5))


def test_which_kernel_runs(monkeypatch):
    calls = []
    dense, small = torch.ops.mkldnn._linear_pointwise, packed_linear.load_small_linear()
    monkeypatch.setattr(packed_linear.torch.ops.mkldnn, "_linear_pointwise",
                        lambda *args: calls.append(("onednn", args[0].shape[0])) or dense(*args), raising=False)
    packed = PackedLinear(nn.Linear(8, 4))
    packed.small = lambda x, *args: calls.append(("small", x.shape[0])) or small(x, *args)
    for rows in (1, SMALL_MAX_ROWS, SMALL_MAX_ROWS + 1, 40):
        packed(torch.randn(rows, 8))
    packed(torch.randn(2, 40, 8))  # not flat: F.linear
    assert calls == [("small", 1), ("small", SMALL_MAX_ROWS), ("onednn", SMALL_MAX_ROWS + 1), ("onednn", 40)]
    assert row_thresholds(nn.Sequential(packed, PackedLinear(nn.Linear(4, 2)))) == {SMALL_MAX_ROWS + 1}


def test_without_the_few_row_op_mkl_serves_under_min_rows(monkeypatch):
    monkeypatch.setattr(packed_linear, "load_small_linear", lambda: None)
    packed = PackedLinear(nn.Linear(8, 4))
    assert packed.min_rows == packed_linear.MIN_ROWS
    x = torch.randn(2, 8)
    torch.testing.assert_close(packed(x), F.linear(x, packed.weight, packed.bias))


def test_the_compiled_graph_runs_both_kernels():
    """Inside torch.compile the oneDNN GEMM goes through ``fusionserve::onednn_linear`` (the packed weight by
    handle) and the few-row op through its fake implementation: no graph break, results equal F.linear's."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    packed = PackedLinear(linear)
    fn = torch.compile(lambda x: packed(x) * 2, dynamic=True, fullgraph=True)
    with torch.inference_mode():
        for rows in (3, 5, SMALL_MAX_ROWS + 1, 40):
            x = torch.randn(rows, 32)
            torch.testing.assert_close(fn(x), 2 * F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


def test_a_handle_dies_with_its_linear():
    import gc

    packed = PackedLinear(nn.Linear(8, 4))
    handle = packed.handle
    assert handle in packed_linear._PACKED
    del packed
    gc.collect()
    assert handle not in packed_linear._PACKED


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


def test_without_a_compiler_mkl_serves_few_rows_with_one_warning(tmp_path):
    """A fresh extension folder and no compiler: the few-row op does not build, one warning says so, and the
    linears still equal F.linear (MKL under MIN_ROWS, oneDNN from there)."""
    from tests.test_paged_attention_cpu import run_without_a_compiler

    script = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "import torch, torch.nn.functional as F\n"
        "from torch import nn\n"
        "from pipeline.models import packed_linear\n"
        "layers = [packed_linear.PackedLinear(nn.Linear(16, 8)) for _ in range(2)]\n"
        "assert {m.min_rows for m in layers} == {packed_linear.MIN_ROWS}\n"
        "for rows in (1, 5):\n"
        "    x = torch.randn(rows, 16)\n"
        "    torch.testing.assert_close(layers[0](x), F.linear(x, layers[0].weight, layers[0].bias))\n")
    run = run_without_a_compiler(script, tmp_path, tmp_path / "ext")
    assert run.stderr.count("CPU few-row linear op unavailable, using F.linear for 1-3 rows") == 1, run.stderr

"""``GatedActivation`` (pipeline/models/gated_activation.py): ``act(gate) * up`` of a fused gate-and-up output,
the one-pass C++ op for tanh GELU against torch's gelu and product, torch's ops everywhere else."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import gated_activation
from pipeline.models.gated_activation import ACTIVATIONS, GatedActivation


def reference(name: str, x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return ACTIVATIONS[name](gate) * up


@pytest.mark.parametrize("rows, width", [(1, 2048), (3, 13), (7, 8), (344, 2048), (2049, 24)])
def test_tanh_gelu_op_equals_torch(rows, width):
    torch.manual_seed(rows)
    act, calls = GatedActivation("gelu_pytorch_tanh"), []
    op = act.op
    act.op = lambda x: calls.append(x.shape) or op(x)
    x = torch.randn(rows, 2 * width) * 4  # gates far into both tails
    torch.testing.assert_close(act(x), reference("gelu_pytorch_tanh", x), rtol=1e-5, atol=1e-5)
    wide = torch.randn(rows, 2 * width + 5)[:, :2 * width]  # rows not adjacent in memory
    torch.testing.assert_close(act(wide), reference("gelu_pytorch_tanh", wide), rtol=1e-5, atol=1e-5)
    assert calls == [x.shape, wide.shape]  # both through the op


def test_tanh_gelu_op_at_the_extremes():
    """Past exp's float32 range the gate's GELU is 0 (not a tiny leftover), large gates pass through, NaN
    stays NaN; 9 values + a scalar tail of the 8-wide loop."""
    gates = torch.tensor([-1e30, -100.0, -9.0, -1e-30, 0.0, 1e-30, 9.0, 100.0, 1e30])
    x = torch.cat((gates, torch.ones(9)))[None]
    out = GatedActivation("gelu_new")(x)[0]
    assert torch.equal(out[:2], torch.zeros(2)) and torch.equal(out[6:], gates[6:])
    torch.testing.assert_close(out, reference("gelu_new", x)[0], rtol=1e-5, atol=1e-6)
    assert GatedActivation("gelu_new")(torch.tensor([[float("nan"), 1.0]])).isnan().all()


def test_the_op_checks_its_inputs():
    op = gated_activation.load_op()
    with pytest.raises(RuntimeError, match=r"x \[T, 2 \* I\]"):
        op(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="float32 only"):
        op(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        op(torch.randn(8, 2).t())


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_and_the_torch_path(name, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(5, 12)
    torch.testing.assert_close(GatedActivation(name)(x), reference(name, x), rtol=1e-5, atol=1e-6)
    for other in (x.double(), x[None], x.t().contiguous().t()):  # not float32, not flat, columns strided
        torch.testing.assert_close(GatedActivation(name)(other), reference(name, other), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(gated_activation, "load_op", lambda: None)  # the op could not be built
    unbuilt = GatedActivation(name)
    assert unbuilt.op is None
    torch.testing.assert_close(unbuilt(x), reference(name, x), rtol=1e-5, atol=1e-6)


def test_the_op_serves_only_on_cpu(monkeypatch):
    monkeypatch.setattr(gated_activation, "load_op", lambda: pytest.fail("loaded for a GPU"))
    act = GatedActivation("gelu_pytorch_tanh", device=None)  # a model built on the meta device: not yet
    assert act.op is None
    act.prepare("cuda")
    assert act.op is None


def test_unknown_activation_is_a_value_error():
    with pytest.raises(ValueError, match="unsupported activation 'swish2'"):
        GatedActivation("swish2")


def test_compiled_graph_calls_the_op():
    """Traced (the compiled decode step) through its fake implementation: one call of the op in the graph."""
    act = GatedActivation("gelu_pytorch_tanh")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(lambda x: act(x) + 1, backend=backend, fullgraph=True)
    x = torch.randn(4, 16)
    torch.testing.assert_close(compiled(x), reference("gelu_pytorch_tanh", x) + 1, rtol=1e-5, atol=1e-5)
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.fusionserve.gelu_tanh_and_mul) == 1

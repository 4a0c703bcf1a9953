"""nn.LSTM / nn.GRU / nn.RNN (tanh and relu) through kiln.compile (fx and torch.export, llvm
and reference backends) match eager PyTorch; ONNX LSTM / GRU / RNN nodes, from
torch.onnx.export and built by hand, match ONNX Runtime; projections, packed sequences and the
ONNX attributes kiln does not read are refused with a KilnError."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils import _pytree as pytree

import kiln
from kiln.backends.llvm import compile_graph
from kiln.backends.reference import run_graph
from kiln.frontend.onnx_import import import_onnx
from kiln.frontend.trace import FrontendFallbackWarning
from kiln.ir import KilnError

RTOL, ATOL = 1e-4, 1e-5
BACKENDS = ("llvm", "reference")


def assert_same(got, expected) -> None:
    """Same nesting (output, (h_n, c_n)) and every tensor within RTOL / ATOL."""
    assert pytree.tree_structure(got) == pytree.tree_structure(expected)
    for g, e in zip(pytree.tree_leaves(got), pytree.tree_leaves(expected), strict=True):
        torch.testing.assert_close(g, e, rtol=RTOL, atol=ATOL)


def check(model: nn.Module, inputs, backend: str = "llvm", frontend: str = "fx") -> None:
    model.eval()
    compiled = kiln.compile(model, inputs, backend=backend, frontend=frontend)
    with torch.no_grad():
        expected = model(*inputs)
    assert_same(compiled(*inputs), expected)


class LstmWithState(nn.Module):
    def __init__(self, rnn: nn.LSTM) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x, h0, c0):
        return self.rnn(x, (h0, c0))


class WithHidden(nn.Module):
    """A GRU or RNN called with its initial hidden state."""

    def __init__(self, rnn: nn.GRU | nn.RNN) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x, h0):
        return self.rnn(x, h0)


def rnn_and_inputs(cls: type, layers: int, bidirectional: bool, batch_first: bool, bias: bool,
                   seq: int, batch: int, with_state: bool, size: int = 5, hidden: int = 6):
    torch.manual_seed(seq * 10 + batch + layers)
    rnn = cls(size, hidden, num_layers=layers, bidirectional=bidirectional,
              batch_first=batch_first, bias=bias)
    x = torch.randn((batch, seq, size) if batch_first else (seq, batch, size))
    if not with_state:
        return rnn, (x,)
    state = [torch.randn(layers * (2 if bidirectional else 1), batch, hidden)
             for _ in range(2 if cls is nn.LSTM else 1)]
    wrapper = LstmWithState(rnn) if cls is nn.LSTM else WithHidden(rnn)
    return wrapper, (x, *state)


class ReluRNN(nn.RNN):
    """nn.RNN with the relu nonlinearity (a subclass keeping RNN's forward: still the layer
    kiln's module table translates)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, nonlinearity="relu", **kwargs)


# (class, layers, bidirectional, batch_first, bias, sequence length, batch, h0 / c0 given)
CONFIGS = [
    (nn.LSTM, 1, False, False, True, 7, 3, False),
    (nn.LSTM, 2, True, True, True, 7, 3, True),
    (nn.LSTM, 2, True, False, False, 1, 1, True),
    (nn.LSTM, 1, True, True, True, 1, 3, False),
    (nn.GRU, 1, False, True, True, 7, 1, True),
    (nn.GRU, 2, True, False, True, 7, 3, False),
    (nn.GRU, 2, False, True, False, 1, 3, True),
    (nn.GRU, 1, True, False, True, 7, 3, True),
    (nn.RNN, 1, False, False, True, 7, 3, False),
    (nn.RNN, 2, True, True, True, 7, 3, True),
    (nn.RNN, 2, False, True, False, 1, 1, True),
    (ReluRNN, 1, True, False, True, 7, 1, True),
    (ReluRNN, 2, False, True, True, 5, 3, False),
]


def _config_id(c) -> str:
    cls, layers, bi, bf, bias, seq, batch, state = c
    return (f"{cls.__name__}-L{layers}{'-bi' if bi else ''}{'-bf' if bf else ''}"
            f"{'' if bias else '-nobias'}-T{seq}-B{batch}{'-state' if state else ''}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=[_config_id(c) for c in CONFIGS])
def test_matches_eager(config, backend: str) -> None:
    model, inputs = rnn_and_inputs(*config)
    check(model, inputs, backend)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN, ReluRNN])
def test_bare_module_is_the_model(cls: type) -> None:
    """The layer itself as the top-level model: outputs (output, (h_n, c_n)) / (output, h_n)
    as eager, with no fallback to torch.export; unbatched input too."""
    torch.manual_seed(0)
    rnn = cls(4, 8, num_layers=2, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrontendFallbackWarning)
        check(rnn, (torch.randn(2, 5, 4),))
        check(rnn, (torch.randn(5, 4),), "reference")


class TextClassifier(nn.Module):
    """embedding -> LSTM -> linear on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(32, 4)

    def forward(self, tokens):
        out, (h_n, c_n) = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_inside_a_model(backend: str) -> None:
    torch.manual_seed(0)
    check(TextClassifier(), (torch.randint(0, 50, (3, 6)),), backend)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN, ReluRNN])
def test_export_frontend(cls: type) -> None:
    """torch.export gives aten.lstm / aten.gru / aten.rnn_tanh / aten.rnn_relu with the flat
    weight list."""
    model, inputs = rnn_and_inputs(cls, 2, True, True, True, 4, 2, True)
    check(model, inputs, "reference", frontend="export")


def test_subclass_keeping_forward_stays_one_module() -> None:
    class OrthogonalLSTM(nn.LSTM):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            nn.init.orthogonal_(self.weight_hh_l0)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrontendFallbackWarning)
        check(OrthogonalLSTM(4, 6), (torch.randn(3, 2, 4),), "reference")


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_projection_is_refused(frontend: str) -> None:
    with pytest.raises(KilnError, match="proj_size"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kiln.compile(nn.LSTM(4, 6, proj_size=3).eval(), (torch.randn(3, 2, 4),),
                     frontend=frontend)


def test_packed_sequence_is_refused() -> None:
    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 6)

        def forward(self, x):
            return self.lstm(pack_padded_sequence(x, [3, 2]))[1][0]

    with pytest.raises(KilnError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kiln.compile(Packed().eval(), (torch.randn(3, 2, 4),))


# ---- ONNX ------------------------------------------------------------------------------------
def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN, ReluRNN])
def test_torch_onnx_export_matches_onnxruntime_and_eager(cls: type, tmp_path) -> None:
    model, inputs = rnn_and_inputs(cls, 2, True, True, True, 5, 2, True)
    model.eval()
    path = tmp_path / "rnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=17)
    arrays = [x.numpy() for x in inputs]
    onnx_model = onnx.load(str(path))
    expected = _ort(onnx_model, {i.name: a for i, a in zip(onnx_model.graph.input, arrays)})
    with torch.no_grad():
        eager = [t.numpy() for t in pytree.tree_leaves(model(*inputs))]
    graph = import_onnx(path)
    # LSTM and GRU (linear_before_reset=1 from PyTorch) become fused recurrent ops.
    activation = {nn.LSTM: "lstm_seq", nn.GRU: "gru_seq", nn.RNN: "tanh", ReluRNN: "relu"}[cls]
    assert {n.op for n in graph.nodes} >= {"linear", activation}
    for got in (run_graph(graph, arrays), compile_graph(graph)(arrays)):
        for g, want, e in zip(got, expected, eager, strict=True):
            np.testing.assert_allclose(g, want, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL)


SEQ, BATCH, SIZE, HIDDEN = 4, 3, 3, 5


def onnx_rnn(op: str, *, direction: str = "forward", layout: int = 0, bias: bool = True,
             initial: bool = False, peephole: bool = False, weights_as_inputs: bool = False,
             attrs: dict | None = None, sequence_lens: np.ndarray | None = None,
             lens_as_input: bool = False) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-node LSTM / GRU / RNN model with seeded operands, and the feeds of its graph
    inputs."""
    rng = np.random.default_rng(len(op) + 7 * layout + len(direction))
    dirs, gates = 2 if direction == "bidirectional" else 1, {"LSTM": 4, "GRU": 3, "RNN": 1}[op]

    def rand(*shape):
        return rng.uniform(-1, 1, shape).astype(np.float32)

    def batchwise(shape):  # [a, batch, ...] in layout 0 is [batch, a, ...] in layout 1
        return (shape[1], shape[0], *shape[2:]) if layout else shape

    operands = {"X": rand(*batchwise((SEQ, BATCH, SIZE))), "W": rand(dirs, gates * HIDDEN, SIZE),
                "R": rand(dirs, gates * HIDDEN, HIDDEN)}
    if bias:
        operands["B"] = rand(dirs, 2 * gates * HIDDEN)
    if sequence_lens is not None:
        operands["sequence_lens"] = sequence_lens.astype(np.int32)
    if initial:
        operands["initial_h"] = rand(*batchwise((dirs, BATCH, HIDDEN)))
        if op == "LSTM":
            operands["initial_c"] = rand(*batchwise((dirs, BATCH, HIDDEN)))
    if peephole:
        operands["P"] = rand(dirs, 3 * HIDDEN)
    order = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]
    names = [n if n in operands else "" for n in order[: 8 if op == "LSTM" else 6]]
    while names[-1] == "":
        names.pop()
    runtime = {"X"} | ({"W", "R", "B"} if weights_as_inputs else set()) | (
        {"sequence_lens"} if lens_as_input else set())
    outputs = ["Y", "Y_h", "Y_c"][: 3 if op == "LSTM" else 2]
    node = helper.make_node(op, names, outputs, hidden_size=HIDDEN, direction=direction,
                            layout=layout, **(attrs or {}))
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype),
                                            a.shape)
              for n, a in operands.items() if n in runtime]
    graph = helper.make_graph(
        [node], op.lower(), inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in zip(
            outputs, [(BATCH, SEQ, dirs, HIDDEN) if layout else (SEQ, dirs, BATCH, HIDDEN)]
            + [batchwise((dirs, BATCH, HIDDEN))] * 2)],
        [numpy_helper.from_array(a, n) for n, a in operands.items() if n not in runtime])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {n: a for n, a in operands.items() if n in runtime}


def onnxruntime_outputs(op: str, **kwargs) -> list[np.ndarray]:
    """ONNX Runtime's outputs of ``onnx_rnn(op, **kwargs)``. ONNX Runtime has no batchwise
    layout: for layout 1 it runs the layout-0 model on the same (transposed) operands."""
    layout = kwargs.pop("layout", 0)
    model, feeds = onnx_rnn(op, layout=layout, **kwargs)
    if not layout:
        return _ort(model, feeds)
    for tensor in model.graph.initializer:
        if tensor.name.startswith("initial_"):
            tensor.CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(tensor).transpose(1, 0, 2), tensor.name))
    for vi in [*model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if vi.name == "X" or vi.name.startswith("Y_"):
            dims[0].dim_value, dims[1].dim_value = dims[1].dim_value, dims[0].dim_value
        elif vi.name == "Y":
            shape = [d.dim_value for d in dims]
            for d, size in zip(dims, (shape[1], shape[2], shape[0], shape[3])):
                d.dim_value = size
    next(a for a in model.graph.node[0].attribute if a.name == "layout").i = 0
    feeds = dict(feeds, X=feeds["X"].transpose(1, 0, 2))
    y, *states = _ort(model, feeds)
    return [y.transpose(2, 0, 1, 3)] + [s.transpose(1, 0, 2) for s in states]


ONNX_CASES = [
    ("LSTM", dict(initial=True, peephole=True)),
    ("LSTM", dict(direction="reverse", bias=False, weights_as_inputs=True)),
    ("LSTM", dict(direction="bidirectional", layout=1, initial=True)),
    ("LSTM", dict(sequence_lens=np.full(BATCH, SEQ))),
    ("GRU", dict(initial=True)),
    ("GRU", dict(direction="bidirectional", weights_as_inputs=True,
                 attrs={"linear_before_reset": 1})),
    ("GRU", dict(direction="reverse", layout=1, initial=True, bias=False)),
    ("GRU", dict(direction="bidirectional", initial=True, attrs={"linear_before_reset": 1})),
    ("RNN", dict(initial=True)),
    ("RNN", dict(direction="reverse", bias=False, weights_as_inputs=True)),
    ("RNN", dict(direction="bidirectional", layout=1, initial=True,
                 attrs={"activations": ["Relu", "Tanh"]})),
    ("RNN", dict(attrs={"activations": ["Sigmoid"]}, sequence_lens=np.full(BATCH, SEQ))),
]


@pytest.mark.parametrize("op,kwargs", ONNX_CASES, ids=[
    f"{op}-" + "-".join(f"{k}={v if not isinstance(v, np.ndarray) else 'full'}"
                        for k, v in kw.items()) for op, kw in ONNX_CASES])
def test_onnx_node_matches_onnxruntime(op: str, kwargs: dict) -> None:
    model, feeds = onnx_rnn(op, **kwargs)
    expected = onnxruntime_outputs(op, **kwargs)
    graph = import_onnx(model)
    arrays = list(feeds.values())
    runs = [run_graph(graph, arrays)]
    if kwargs.get("initial"):  # one llvm run per op and layout
        runs.append(compile_graph(graph)(arrays))
    for got in runs:
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape
            np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("op,kwargs,match", [
    ("LSTM", dict(attrs={"activations": ["Sigmoid", "Relu", "Tanh"]}), "activations"),
    ("GRU", dict(attrs={"clip": 3.0}), "clip"),
    ("LSTM", dict(attrs={"input_forget": 1}), "input_forget"),
    ("GRU", dict(sequence_lens=np.array([SEQ, 2, SEQ])), "sequence_lens"),
    ("LSTM", dict(sequence_lens=np.full(BATCH, SEQ), lens_as_input=True), "must be a constant"),
    ("RNN", dict(attrs={"activations": ["LeakyRelu"], "activation_alpha": [0.1]}),
     "activation LeakyRelu"),
    ("RNN", dict(direction="bidirectional", attrs={"activations": ["Tanh"]}),
     "1 activations for 2 direction"),
    ("RNN", dict(attrs={"clip": 3.0}), "clip"),
])
def test_onnx_refusals(op: str, kwargs: dict, match: str) -> None:
    model, _ = onnx_rnn(op, **kwargs)
    with pytest.raises(KilnError, match=match):
        import_onnx(model)


def test_onnx_default_activations_spelled_out_are_read() -> None:
    model, feeds = onnx_rnn("GRU", direction="bidirectional", attrs={
        "activations": ["Sigmoid", "Tanh", "Sigmoid", "Tanh"]})
    got = run_graph(import_onnx(model), list(feeds.values()))
    for g, e in zip(got, _ort(model, feeds), strict=True):
        np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("threads", [1, 2])
def test_wide_layers_run_their_steps_as_one_team(cls: type, threads: int) -> None:
    """Layers wide enough for a parallel recurrent product run all their steps in one
    parallel region (a ``team`` loop: barriers between a step's phases), bidirectional and
    stacked, with eager's answers at every thread count."""
    torch.manual_seed(0)
    rnn = cls(32, 128, num_layers=2, bidirectional=True).eval()
    x = torch.randn(9, 2, 32)
    compiled = kiln.compile(rnn, (x,), threads=threads)
    compiled.executable.program.threads(threads, adaptive=False)
    from kiln.backends.llvm.compiler import default_target
    from kiln.passes.compile import compile_kernels

    target = default_target()
    lowered = compile_kernels(compiled.graph, width=target.f32_lanes, target=target).lowered
    kernels = [str(s.kernel) for s in lowered.steps]
    assert sum("team for" in k for k in kernels) == 4   # 2 layers x 2 directions
    with torch.no_grad():
        expected = rnn(x)
    for _ in range(3):
        assert_same(compiled(x), expected)

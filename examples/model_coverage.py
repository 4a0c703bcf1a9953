"""Real-model coverage: torchvision and HuggingFace models, random weights, compiled by kiln.

Builds every torchvision classification model of at most 100M parameters, the torchvision
segmentation models with ResNet-50 / MobileNetV3 backbones, and eight small HuggingFace
transformers architectures from config objects, all with seeded random weights (nothing is
ever downloaded: the HuggingFace hub is put offline before transformers is imported). For
each model it prints the parameter count, whether kiln compiled it (or the first line of
the KilnError), kiln's largest error against eager PyTorch relative to the output's
magnitude, kiln's compile time, and the median latency at batch 1 of kiln, eager PyTorch and
ONNX Runtime (through ``torch.onnx.export``), all on the same number of threads.

    python -m kiln.examples.model_coverage --suite torchvision --models resnet18,alexnet
    python -m kiln.examples.model_coverage --suite all --repeat 20

The test suites in ``tests/models/`` build their models with the functions here.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

# No download, ever: models are built from configs with random weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

THREADS = 2
"""The thread count every latency is measured at (kiln, eager PyTorch and ONNX Runtime)."""

MAX_PARAMS = 100_000_000
"""torchvision classification models above this many parameters are left out."""

OVER_MAX_PARAMS = {
    "convnext_large": 197.8, "efficientnet_v2_l": 118.5, "regnet_x_32gf": 107.8,
    "regnet_y_32gf": 145.0, "regnet_y_128gf": 644.8, "vgg11": 132.9, "vgg11_bn": 132.9,
    "vgg13": 133.0, "vgg13_bn": 133.1, "vgg16": 138.4, "vgg16_bn": 138.4, "vgg19": 143.7,
    "vgg19_bn": 143.7, "vit_h_14": 632.0, "vit_l_16": 304.3, "vit_l_32": 306.5,
    "wide_resnet101_2": 126.9,
}
"""torchvision classification models of more than MAX_PARAMS parameters (millions, measured
with torchvision 0.28): listed rather than built, since the largest take gigabytes."""

SEGMENTATION = ("fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large",
                "lraspp_mobilenet_v3_large")
"""torchvision segmentation models covered (ResNet-50 and MobileNetV3 backbones)."""

SWIN = ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b")
"""torchvision's Swin Transformers (v1 and v2)."""

IMAGE_SIZE = {"inception_v3": 96, "maxvit_t": 224, "vit_b_16": 224, "vit_b_32": 224,
              **dict.fromkeys(SWIN, 224)}
"""Input resolution of the models that cannot run at the default (64x64), and of the Swin
Transformers, checked at the resolution they are made for: at 64x64 their last stages hold
maps smaller than one window, where windows shrink to the map and nothing shifts."""

DEFAULT_IMAGE_SIZE = 64

CALIBRATED = ("googlenet", "inception_v3", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
              "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "deeplabv3_mobilenet_v3_large")
"""Models whose batch norm statistics are set from a random batch (see
``_calibrate_batchnorm``): at their initial statistics their outputs hardly depend on the
input. Not all models: in EfficientNet-B4 it amplifies rounding, and eager float32 itself
ends 1.5e-2 away from float64."""

# Operators torchvision's C extension defines and its Python code registers fake kernels for
# unconditionally (torchvision/_meta_registrations.py); the schemas are the extension's own.
_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_torchvision_library: list[torch.library.Library] = []


def import_torchvision() -> Any:
    """Import torchvision for its model definitions, whether or not its C extension loads.

    The torchvision wheel on PyPI is a CUDA build: beside a CPU-only torch its extension
    cannot load, and the import then fails registering fake kernels for ``torchvision::nms``
    (an operator the extension would have defined). The models need none of its C ops, so
    when that happens the missing schemas are defined and the import is retried; the ops
    stay without kernels, and calling one raises as it would have.
    """
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        # The failed import left half-initialized torchvision modules behind.
        for module in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[module]
        library = torch.library.Library("torchvision", "FRAGMENT")
        for op, schema in _TORCHVISION_SCHEMAS.items():
            if not _has_op("torchvision", op):
                library.define(schema)
        # Kept alive for the process: dropping the Library would remove its definitions.
        _torchvision_library.append(library)
        import torchvision
    return torchvision


def _has_op(namespace: str, name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"{namespace}::{name}", "")
    except RuntimeError:
        return False
    return True


@dataclass
class Case:
    """A model ready to compile: ``model(*inputs)`` runs it and ``main`` picks its main
    output tensor (logits, the segmentation map, the last hidden state)."""

    name: str
    model: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    main: Callable[[Any], torch.Tensor]

    def parameters(self) -> int:
        """The model's parameter count."""
        return sum(p.numel() for p in self.model.parameters())


def torchvision_names() -> list[str]:
    """Every torchvision classification model of at most MAX_PARAMS parameters, then the
    segmentation models, in torchvision's order."""
    models = import_torchvision().models
    names = [n for n in models.list_models(module=models) if n not in OVER_MAX_PARAMS]
    return names + list(SEGMENTATION)


def build_torchvision(name: str, seed: int = 0, image_size: int | None = None) -> Case:
    """torchvision model ``name`` with seeded random weights, in eval mode, and one image
    batch at the smallest resolution it accepts among the ones tried, or at ``image_size``
    (at least that model's own size in IMAGE_SIZE)."""
    models = import_torchvision().models
    torch.manual_seed(seed)
    if name in SEGMENTATION:
        model = models.get_model(name, weights=None, weights_backbone=None)
        main: Callable[[Any], torch.Tensor] = _segmentation_out
    else:
        # PyTorch's default initialization: these two models' own (init_weights=True) makes
        # GoogLeNet's logits the same for every input and Inception's reach 1e9.
        kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
        model = models.get_model(name, weights=None, **kwargs)
        main = _identity
    _randomize_zero_weights(model)
    size = max(IMAGE_SIZE.get(name, 0), image_size or DEFAULT_IMAGE_SIZE)
    model.eval()
    if name in CALIBRATED:
        _calibrate_batchnorm(model, torch.randn(
            8, 3, size, size, generator=torch.Generator().manual_seed(seed + 2)))
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return Case(name, model, (x,), main)


def _calibrate_batchnorm(model: torch.nn.Module, batch: torch.Tensor) -> None:
    """Set every batch norm's running statistics to those of ``batch``, as training would.

    With freshly initialized statistics (mean 0, variance 1) activations shrink or grow
    layer after layer, until some models' outputs (GoogLeNet, Inception, ShuffleNet,
    DeepLabV3-MobileNet) hardly depend on the input, and a comparison with eager would not
    see a wrong feature path. Only the batch norms run in training mode: dropout and
    auxiliary heads stay as in eval.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None            # a cumulative average: one batch sets the statistics
        norm.train()
    with torch.no_grad():
        model(batch)
    for norm in norms:
        norm.momentum = 0.1             # PyTorch's default, as the model was built
        norm.eval()


def _randomize_zero_weights(model: torch.nn.Module) -> None:
    """Draw the weights torchvision initializes to zeros (ViT's classifier and class token)
    from N(0, 0.02): a zero classifier makes every output zero, and a comparison with eager
    on zeros proves nothing."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.normal_(0.0, 0.02)


def _segmentation_out(out: Any) -> torch.Tensor:
    return out["out"]


def _identity(out: Any) -> torch.Tensor:
    return out


class Positional(torch.nn.Module):
    """Calls a HuggingFace model with its tensors passed positionally, bound to the keyword
    names its ``forward`` takes (their positional order differs between models), and
    returns the main output tensor rather than a ``ModelOutput``."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        """The wrapped model's first output (logits or last hidden state)."""
        return self.model(**dict(zip(self.names, args)))[0]


def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


TRANSFORMERS = ("bert", "distilbert", "roberta", "gpt2", "t5_encoder", "vit", "whisper_encoder",
                "llama")
"""The HuggingFace architectures covered, each built small from its config."""

VOCAB, SEQ, HIDDEN = 1000, 16, 64


def prepare_transformers() -> None:
    """Make torchvision importable before transformers imports it (for its image models'
    processors): an installed torchvision that cannot import would make every model
    class fail to import."""
    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()


def _text_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an attention mask whose last four positions are padding."""
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(seed + 1))
    mask = torch.ones(1, SEQ, dtype=torch.int64)
    mask[:, -4:] = 0
    return ids, mask


def build_transformers(name: str, seed: int = 0) -> Case:
    """HuggingFace model ``name`` (one of TRANSFORMERS), small, with seeded random weights,
    in eval mode, wrapped in ``Positional``; text models get an attention mask with padding."""
    prepare_transformers()
    import transformers as hf

    torch.manual_seed(seed)
    small = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128)
    text = dict(small, vocab_size=VOCAB, max_position_embeddings=64)
    names: tuple[str, ...] = ("input_ids", "attention_mask")
    inputs: tuple[torch.Tensor, ...] = _text_inputs(seed)
    if name == "bert":
        model = hf.BertModel(hf.BertConfig(**text))
    elif name == "distilbert":
        model = hf.DistilBertModel(hf.DistilBertConfig(
            vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=2, hidden_dim=128,
            max_position_embeddings=64))
    elif name == "roberta":
        model = hf.RobertaModel(hf.RobertaConfig(**text))
    elif name == "gpt2":
        model = hf.GPT2LMHeadModel(hf.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
            eos_token_id=0,
            use_cache=False))
    elif name == "t5_encoder":
        model = hf.T5EncoderModel(hf.T5Config(
            vocab_size=VOCAB, d_model=HIDDEN, d_kv=32, d_ff=128, num_layers=2, num_heads=2))
    elif name == "vit":
        model = hf.ViTModel(hf.ViTConfig(**small, image_size=32, patch_size=8),
                            add_pooling_layer=False)
        names = ("pixel_values",)
        inputs = (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1)),)
    elif name == "whisper_encoder":
        config = hf.WhisperConfig(
            vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, encoder_attention_heads=2,
            decoder_layers=2, decoder_attention_heads=2, encoder_ffn_dim=128,
            decoder_ffn_dim=128, num_mel_bins=80, max_source_positions=32,
            max_target_positions=32, pad_token_id=0, bos_token_id=0, eos_token_id=0,
            decoder_start_token_id=0)
        model = hf.WhisperModel(config).get_encoder()
        names = ("input_features",)
        # The encoder's two convolutions halve the frames to max_source_positions.
        inputs = (torch.randn(1, 80, 64, generator=torch.Generator().manual_seed(seed + 1)),)
    elif name == "llama":
        model = hf.LlamaForCausalLM(hf.LlamaConfig(**text, num_key_value_heads=1,
                                                   use_cache=False))
    else:
        raise ValueError(f"unknown transformers model {name!r}: choose from {TRANSFORMERS}")
    return Case(name, Positional(model.eval(), names).eval(), inputs, _first)


def build(suite: str, name: str, seed: int = 0, image_size: int | None = None) -> Case:
    """Model ``name`` of ``suite`` ("torchvision" or "transformers"); ``image_size``: the
    torchvision input resolution (default: DEFAULT_IMAGE_SIZE)."""
    return build_torchvision(name, seed, image_size) if suite == "torchvision" else \
        build_transformers(name, seed)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``want``."""
    scale = want.abs().max().item() or 1.0
    return (got.float() - want.float()).abs().max().item() / scale


def _median_ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up: first-call allocation and lazy initialization
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _interleaved_ms(fns: list[Callable[[], Any]], repeat: int) -> list[float]:
    """Each function's median time (ms) over ``repeat`` rounds of the functions in turn. In
    a round each one is called once untimed, then timed: the untimed call absorbs the
    previous function's OpenMP workers still spinning (kiln's and torch's pools are
    different threads on the same cores), which would otherwise slow the timed one."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            fn()
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) * 1e3 for ts in times]


def _ort_latency(case: Case, repeat: int) -> str:
    """ONNX Runtime's median latency, or "n/a: <reason>" when the export or the run fails."""
    import onnxruntime as ort

    model = case.model if isinstance(case.model, Positional) else _Main(case)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:
            # The TorchScript exporter: the dynamo one needs onnxscript, not a kiln dependency.
            with _stdout_silenced():
                torch.onnx.export(model, case.inputs, path, dynamo=False)
            options = ort.SessionOptions()
            options.intra_op_num_threads = THREADS
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # any exporter or ORT failure is a table cell, not a crash
            return f"n/a: {_first_line(e)}"
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), case.inputs)}
    return f"{_median_ms(lambda: session.run(None, feed), repeat):.2f}"


@contextlib.contextmanager
def _stdout_silenced() -> Iterator[None]:
    """Silence file descriptor 1: on failure the exporter's C++ side prints the whole
    TorchScript graph there, which would bury the table."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


class _Main(torch.nn.Module):
    """A torchvision model returning only its main output (the segmentation dict's "out")."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.model = case.model
        self.main = case.main

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The main output tensor."""
        return self.main(self.model(x))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:120]


def measure(suite: str, name: str, repeat: int, image_size: int | None = None
            ) -> dict[str, Any]:
    """One table row: build ``name``, compile it with kiln, compare with eager and time kiln,
    eager and ONNX Runtime at batch 1 on THREADS threads."""
    import kiln

    case = build(suite, name, image_size=image_size)
    row: dict[str, Any] = {"model": name, "params_m": case.parameters() / 1e6}
    torch.set_num_threads(THREADS)
    with torch.no_grad():
        want = case.main(case.model(*case.inputs))
        start = time.perf_counter()
        try:
            compiled = kiln.compile(case.model, case.inputs, threads=THREADS)
        except kiln.KilnError as e:
            row["status"] = f"refused: {_first_line(e)}"
            compiled = None
        row["compile_s"] = time.perf_counter() - start
        if compiled is not None:
            got = case.main(compiled(*case.inputs))
            row["error"] = relative_error(got, want)
            row["status"] = f"compiled ({compiled.frontend})"
            # kiln and eager interleaved, call by call: both see the same minutes of a
            # machine whose speed drifts (ORT is timed after: its idle workers spin on).
            row["kiln_ms"], row["eager_ms"] = _interleaved_ms(
                [lambda: compiled(*case.inputs), lambda: case.model(*case.inputs)], repeat)
        else:
            row["eager_ms"] = _median_ms(lambda: case.model(*case.inputs), repeat)
        row["ort_ms"] = _ort_latency(case, repeat)
    return row


def format_row(row: dict[str, Any]) -> str:
    """A markdown table row for ``measure``'s result."""
    error = f"{row['error']:.1e}" if "error" in row else "-"
    kiln_ms = f"{row['kiln_ms']:.2f}" if "kiln_ms" in row else "-"
    return (f"| {row['model']} | {row['params_m']:.1f}M | {row['status']} | {error} | "
            f"{row['compile_s']:.1f} | {kiln_ms} | {row['eager_ms']:.2f} | {row['ort_ms']} |")


HEADER = ("| model | params | kiln | max err / max | compile s | kiln ms | eager ms | ORT ms |\n"
          "|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> None:
    """Print the coverage table for the chosen suite(s) or models."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=("torchvision", "transformers", "all"),
                        default="all")
    parser.add_argument("--models", default="",
                        help="comma-separated model names (default: the whole suite)")
    parser.add_argument("--repeat", type=int, default=10,
                        help="timed runs per latency (the median is printed)")
    parser.add_argument("--size", type=int, default=None,
                        help=f"torchvision input resolution (default {DEFAULT_IMAGE_SIZE}; "
                             "models that need more keep theirs)")
    args = parser.parse_args(argv)
    suites = ("torchvision", "transformers") if args.suite == "all" else (args.suite,)
    available = {suite: torchvision_names() if suite == "torchvision" else list(TRANSFORMERS)
                 for suite in suites}
    wanted = [m for m in args.models.split(",") if m]
    unknown = set(wanted).difference(*available.values())
    if unknown:
        parser.error(f"unknown models {sorted(unknown)} in --suite {args.suite}")
    print(f"batch 1, {THREADS} threads, median of {args.repeat} runs, torchvision at "
          f"{args.size or DEFAULT_IMAGE_SIZE}x{args.size or DEFAULT_IMAGE_SIZE}")
    print(HEADER, flush=True)
    for suite, names in available.items():
        for name in names:
            if not wanted or name in wanted:
                print(format_row(measure(suite, name, args.repeat, args.size)), flush=True)


if __name__ == "__main__":
    main()

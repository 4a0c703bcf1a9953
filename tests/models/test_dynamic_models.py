"""Dynamic shapes end to end (heavy): ResNet-18 at 224x224 and a BERT encoder with 512
positions (HuggingFace BertModel from a config, random weights) match eager within 1e-4 of the
output max at batch 1, 3, 8, 32 (and lengths 16, 100, 512) through kiln.compile(dynamic=),
torch.compile(backend="kiln"), kiln.export + kiln.load, and the C library.

    python -m pytest -q -p no:xdist tests/models/test_dynamic_models.py -m heavy
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

import kiln
from kiln.interop.c_library import export_c, find_c_compiler
from kiln.zoo import get_model

pytestmark = pytest.mark.heavy
BATCHES = (1, 3, 8, 32)
SEQS = (16, 100, 512)


def err(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


class Bert(torch.nn.Module):
    """A small BERT encoder with 512 positions; returns the last hidden state."""

    def __init__(self):
        super().__init__()
        from kiln.examples.model_coverage import prepare_transformers
        prepare_transformers()
        import transformers as hf
        torch.manual_seed(0)
        self.m = hf.BertModel(hf.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=128,
                                            max_position_embeddings=512)).eval()

    def forward(self, ids):
        return self.m(input_ids=ids).last_hidden_state


def cases(name: str):
    """(model, example inputs, dynamic=, [(key, inputs)] for every batch (and length))."""
    if name == "resnet18":
        model, (x,) = get_model("resnet18")
        g = torch.Generator().manual_seed(0)
        return model, (x,), True, [(b, (torch.randn((b, *x.shape[1:]), generator=g),))
                                   for b in BATCHES]
    model = Bert().eval()
    g = torch.Generator().manual_seed(1)
    ex = torch.randint(0, 1000, (1, 16), generator=g)
    spec = {0: {0: "batch", 1: torch.export.Dim("seq", max=512)}}
    return model, (ex,), spec, [((b, s), (torch.randint(0, 1000, (b, s), generator=g),))
                               for s in SEQS for b in BATCHES]


def c_run(lib_dir: Path, nsizes: int, size_vals: list[int], arrays: list[np.ndarray],
          out_shape: tuple[int, ...]) -> np.ndarray:
    """One call of the exported C library's model_run at these sizes."""
    lib = ctypes.CDLL(str(lib_dir / "libmodel.so"))
    lib.model_load.restype = ctypes.c_void_p
    lib.model_run.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64),
                              ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)]
    lib.model_error.restype = ctypes.c_char_p
    h = lib.model_load(str(lib_dir / "model_weights.bin").encode())
    out = np.empty(out_shape, np.float32)
    ins = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
    rc = lib.model_run(h, (ctypes.c_int64 * nsizes)(*size_vals), ins,
                       (ctypes.c_void_p * 1)(out.ctypes.data))
    lib.model_free.argtypes = [ctypes.c_void_p]
    lib.model_free(h)
    assert rc == 0, lib.model_error()
    return out


@pytest.mark.parametrize("name", ["resnet18", "bert"])
def test_dynamic_model_matches_eager_on_every_path(name: str, tmp_path: Path) -> None:
    model, ex, spec, calls = cases(name)
    with torch.no_grad():
        wants = {key: model(*xs).numpy() for key, xs in calls}
    worst = dict.fromkeys(("kiln.compile", "torch.compile", "export+load", "C library"), 0.0)
    dyn = kiln.compile(model, ex, dynamic=spec)
    for key, xs in calls:
        worst["kiln.compile"] = max(worst["kiln.compile"], err(dyn(*xs), wants[key]))
    # Row counts 3 ran as 2 + 1: no program of their own.
    assert all(k[0] != 3 for k in dyn._programs), sorted(dyn._programs)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="kiln")
    with torch.no_grad():
        for key, xs in calls:
            worst["torch.compile"] = max(worst["torch.compile"], err(fast(*xs), wants[key]))
    torch._dynamo.reset()
    kiln.export(dyn, tmp_path / "m.kiln")
    loaded = kiln.load(tmp_path / "m.kiln")
    for key, xs in calls:
        worst["export+load"] = max(worst["export+load"],
                                   err(loaded(*[x.numpy() for x in xs]), wants[key]))
    if find_c_compiler() is not None:
        lib_dir = export_c(dyn, tmp_path / "lib")
        header = (lib_dir / "model.h").read_text().splitlines()
        names = [line.split('"')[1] for line in header if '_NAME "' in line]
        for key, xs in calls:
            vals = {"batch": xs[0].shape[0], "seq": xs[0].shape[-1]}
            arrays = [np.ascontiguousarray(x.numpy()) for x in xs]
            out = c_run(lib_dir, len(names), [vals[n] for n in names], arrays, wants[key].shape)
            worst["C library"] = max(worst["C library"], err(out, wants[key]))
    assert all(v <= 1e-4 for v in worst.values()), worst

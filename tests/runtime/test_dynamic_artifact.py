"""Artifacts of dynamic models: kiln.export writes a program per compiled set of sizes,
kiln.load runs each size with the original's answers and refuses others by name; a header
edited to make the programs disagree is refused before any code is linked."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import kiln
from kiln.runtime.artifact import ArtifactError, read_image
from kiln.runtime.artifact import format as artifact_format
from kiln.zoo import get_model

PREFIX = artifact_format.PREFIX
LEAD = PREFIX.size + artifact_format.DIGEST_BYTES


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, (x,) = get_model("lenet5")
    dyn = kiln.compile(model, (x,), dynamic={"x": {0: torch.export.Dim("batch", max=16)}})
    inputs = {b: torch.randn(b, *x.shape[1:], generator=torch.Generator().manual_seed(b))
              for b in (1, 3, 8)}
    for b in (3, 8):
        dyn.specialize(inputs[b])     # compiled for exactly these sizes (a call of 3 runs 2+1)
    path = tmp_path_factory.mktemp("dyn") / "lenet_dynamic.kiln"
    kiln.export(dyn, path)
    with torch.no_grad():
        expected = {b: model(v).numpy() for b, v in inputs.items()}
    return path, {b: v.numpy() for b, v in inputs.items()}, expected


def test_every_exported_size_runs_and_matches_eager(exported) -> None:
    path, inputs, expected = exported
    loaded = kiln.load(path)
    assert sorted(s["batch"] for s in loaded.sizes) == [1, 3, 8]
    assert loaded.bounds == {"batch": (1, 16)}
    for b, x in inputs.items():
        np.testing.assert_allclose(loaded(x), expected[b], rtol=1e-4, atol=1e-5)
    from_bytes = kiln.load(path.read_bytes())
    np.testing.assert_allclose(from_bytes(inputs[3]), expected[3], rtol=1e-4, atol=1e-5)


def test_row_counts_not_exported_run_on_row_slices(exported) -> None:
    path, inputs, _ = exported
    loaded = kiln.load(path)
    assert loaded.manifest["dynamic"]["rows"] == "batch"
    model, _ = get_model("lenet5")
    gen = torch.Generator().manual_seed(5)
    for n in (2, 11, 16):                       # 1+1, 8+3, 8+8
        x = torch.randn(n, *inputs[1].shape[1:], generator=gen)
        with torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(loaded(x.numpy()), want, rtol=1e-4, atol=1e-5)


def test_sizes_not_exported_and_wrong_inputs_are_refused(exported) -> None:
    path, inputs, _ = exported
    raw = _resealed(path.read_bytes(), lambda h: h["dynamic"].pop("rows"))
    loaded = kiln.load(raw)                     # rows not declared: every size is its own
    with pytest.raises(kiln.KilnError, match=r"programs for .*'batch': 3.*brings \{'batch': 2\}"):
        loaded(np.zeros((2, *inputs[1].shape[1:]), np.float32))
    with pytest.raises(kiln.KilnError, match="expects f32"):
        loaded(inputs[3].astype(np.float64))
    with pytest.raises(ArtifactError, match="dynamic model"):
        read_image(path)


def _resealed(raw: bytes, edit) -> bytes:
    n = PREFIX.unpack_from(raw)[2]
    header = json.loads(raw[LEAD:LEAD + n])
    rest = raw[LEAD + n:]
    edit(header)
    head = json.dumps(header).encode()
    return (PREFIX.pack(artifact_format.MAGIC, 2, len(head)) + hashlib.sha256(head).digest()
            + head + rest)


def _set(path: list, value):
    def edit(header):
        node = header
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (_set(["dynamic", "dims"], [[0, 1, "batch"]]), "differs from the first program"),
    (_set(["dynamic", "dims"], [[1, 0, "batch"]]), "is malformed"),
    (_set(["dynamic", "bounds", "batch"], [1, 2]), "outside 1..2"),
    (_set(["dynamic", "bounds"], {}), "bounds of batch"),
    (_set(["dynamic", "variants", 0, "prefix"], "v2."), "prefix v1."),
    (lambda h: h["dynamic"]["variants"].append(dict(h["dynamic"]["variants"][0])),
     "prefix v3."),
    (lambda h: h["dynamic"]["variants"].pop(), "parts no program uses"),
    (lambda h: h.pop("dynamic"), "parts no program uses"),
    (_set(["dynamic", "variants", 0, "inputs", 0, 2, 0], 1), "signature|repeats the sizes"),
    (_set(["dynamic", "rows"], "seq"), "dynamic.rows must name"),
    (_set(["dynamic", "rows"], ["batch"]), "dynamic.rows must name"),
    (_set(["dynamic", "extra"], 1), "unknown entries"),
])
def test_edited_dynamic_headers_are_refused(exported, edit, message) -> None:
    path, _, _ = exported
    with pytest.raises(ArtifactError, match=message):
        kiln.load(_resealed(path.read_bytes(), edit))

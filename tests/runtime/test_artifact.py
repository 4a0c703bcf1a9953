"""kiln.export / kiln.load: bit-exact round trip, loading without PyTorch, and a corpus of
broken or malicious artifacts that must be refused with a typed error before any code runs."""

from __future__ import annotations

import json
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import kiln
from kiln.examples.models import ZOO, get_model
from kiln.runtime.artifact import MAGIC, ArtifactError

PREFIX = struct.Struct("<8sIQ")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[pathlib.Path, list[np.ndarray], np.ndarray]:
    model, inputs = get_model("lenet5")
    compiled = kiln.compile(model, inputs)
    path = kiln.export(compiled, tmp_path_factory.mktemp("art") / "lenet5.kiln")
    arrays = [x.numpy() for x in inputs]
    return path, arrays, compiled(*arrays)


@pytest.mark.parametrize("name", ["resnet18_cifar", "bert"])
def test_compressed_int8_round_trip_is_bit_exact(name: str, tmp_path) -> None:
    model, inputs = get_model(name)
    gen = torch.Generator().manual_seed(0)
    data = [tuple(torch.randn(x.shape, generator=gen) if x.is_floating_point() else x
                  for x in inputs) for _ in range(2)]
    compiled = kiln.compile(model, inputs, prune={"ratio": 0.25}, quantize=True, data=data)
    arrays = [x.numpy() for x in inputs]
    loaded = kiln.load(kiln.export(compiled, tmp_path / f"{name}.kiln"))
    assert np.array_equal(loaded(*arrays), compiled(*arrays))
    assert loaded.manifest["pipeline"] == ["pruned", "O1", "int8"]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_round_trip_is_bit_exact(name: str, tmp_path) -> None:
    model, inputs = get_model(name)
    compiled = kiln.compile(model, inputs)
    arrays = [x.numpy() for x in inputs]
    loaded = kiln.load(kiln.export(compiled, tmp_path / f"{name}.kiln"))
    assert np.array_equal(loaded(*arrays), compiled(*arrays))
    assert loaded.manifest["pipeline"] == ["fold_constants", "simplify_algebra", "dce",
                                           "fold_batchnorm", "cse", "dce"]


def test_loads_without_pytorch(exported) -> None:
    path, arrays, expected = exported
    np.save(path.with_suffix(".in.npy"), arrays[0])
    np.save(path.with_suffix(".out.npy"), expected)
    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "sys.modules['scipy'] = None\n"
        "import numpy as np, kiln\n"
        f"m = kiln.load({str(path)!r})\n"
        f"x = np.load({str(path.with_suffix('.in.npy'))!r})\n"
        f"want = np.load({str(path.with_suffix('.out.npy'))!r})\n"
        "assert np.array_equal(m(x), want)\n"
        "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_export_does_not_overwrite(exported, tmp_path) -> None:
    path, _, _ = exported
    model, inputs = get_model("lenet5")
    compiled = kiln.compile(model, inputs)
    before = path.read_bytes()
    with pytest.raises(kiln.KilnError, match="already exists"):
        kiln.export(compiled, path)
    assert path.read_bytes() == before


def test_reference_backend_has_nothing_to_export(tmp_path) -> None:
    model, inputs = get_model("mlp")
    with pytest.raises(kiln.KilnError, match="no native code"):
        kiln.export(kiln.compile(model, inputs, backend="reference"), tmp_path / "m.kiln")


def test_wrong_input_is_refused(exported) -> None:
    loaded = kiln.load(exported[0])
    with pytest.raises(kiln.KilnError, match="expects f32"):
        loaded(np.zeros((1, 1, 8, 8), np.float32))


# ---- the corpus ------------------------------------------------------------------------------
def _split(raw: bytes) -> tuple[dict, bytes]:
    _, _, n = PREFIX.unpack_from(raw)
    return json.loads(raw[PREFIX.size:PREFIX.size + n]), raw[PREFIX.size + n:]


def _join(header: dict, data: bytes, fmt: int = 1, magic: bytes = MAGIC) -> bytes:
    head = json.dumps(header).encode()
    return PREFIX.pack(magic, fmt, len(head)) + head + data


def _mutations(raw: bytes) -> dict[str, bytes]:
    header, data = _split(raw)
    code = header["parts"]["code"]
    out = {}
    out["empty file"] = b""
    out["truncated prefix"] = raw[:10]
    out["truncated header"] = raw[:PREFIX.size + 20]
    out["truncated data"] = raw[:len(raw) - 100]
    out["bad magic"] = b"NOTKILN\0" + raw[8:]
    out["future format"] = _join(header, data, fmt=99)
    bad = json.loads(json.dumps(header))
    bad["format"] = 2
    out["format mismatch in header"] = _join(bad, data)
    flipped = bytearray(data)
    flipped[code["offset"] + code["size"] // 2] ^= 0x01
    out["flipped code byte"] = _join(header, bytes(flipped))
    out["header length past end"] = PREFIX.pack(MAGIC, 1, len(raw) * 4) + raw[PREFIX.size:]
    out["oversized header length"] = PREFIX.pack(MAGIC, 1, 1 << 40) + raw[PREFIX.size:]
    out["header not json"] = PREFIX.pack(MAGIC, 1, 4) + b"{{{{" + data
    out["header not an object"] = _join([1, 2, 3], data)  # type: ignore[arg-type]

    def edit(name, fn):
        h = json.loads(json.dumps(header))
        fn(h)
        out[name] = _join(h, data)

    edit("offset out of range", lambda h: h["parts"]["code"].update(offset=len(data)))
    edit("negative offset", lambda h: h["parts"]["code"].update(offset=-64))
    edit("size out of range", lambda h: h["parts"]["consts"].update(size=1 << 50))
    edit("overlapping parts", lambda h: h["parts"]["consts"].update(
        offset=code["offset"], size=code["size"], sha256=code["sha256"]))
    edit("path traversal in part name",
         lambda h: h["parts"].update({"../../etc/passwd": dict(code)}))
    edit("absolute path in input name", lambda h: h["inputs"][0].__setitem__(0, "/etc/passwd"))
    edit("shape product overflow",
         lambda h: h["inputs"][0].__setitem__(2, [1 << 39, 1 << 39, 1 << 39]))
    edit("negative dimension", lambda h: h["outputs"][0].__setitem__(2, [-1, 10]))
    edit("unknown dtype", lambda h: h["inputs"][0].__setitem__(1, "object"))
    edit("huge arena", lambda h: h.update(arena_bytes=1 << 60))
    edit("missing code part", lambda h: h["parts"].pop("code"))
    edit("foreign architecture", lambda h: h["target"].update(triple="aarch64-unknown-linux"))
    edit("missing cpu feature", lambda h: h["target"].update(
        features=h["target"]["features"] + ",+kiln-imaginary-isa"))
    edit("output copy out of range", lambda h: h.update(output_copies={"0": ["input", 99]}))
    # A pickle where a tensor belongs: a part holding pickle bytes, declared as a tensor of an
    # object dtype (refused), or of a numeric dtype whose size does not match (refused).
    pickled = b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR." + b"\0" * 13
    pdata = data + pickled
    ph = json.loads(json.dumps(header))
    ph["parts"]["output0"] = {"offset": len(data), "size": len(pickled),
                              "sha256": __import__("hashlib").sha256(pickled).hexdigest()}
    ph["tensors"] = {"output0": {"dtype": "O", "shape": [1], "output": 0}}
    out["pickle as object tensor"] = _join(ph, pdata)
    ph2 = json.loads(json.dumps(ph))
    ph2["tensors"] = {"output0": {"dtype": "f32", "shape": [1000], "output": 0}}
    out["pickle with wrong size"] = _join(ph2, pdata)
    return out


def test_every_broken_artifact_is_refused(exported, tmp_path) -> None:
    raw = exported[0].read_bytes()
    mutations = _mutations(raw)
    assert len(mutations) >= 25
    for name, blob in mutations.items():
        path = tmp_path / "bad.kiln"
        path.write_bytes(blob)
        with pytest.raises(ArtifactError):
            kiln.load(path)
        assert isinstance(ArtifactError("x"), kiln.KilnError), name


def test_corpus_is_refused_before_any_code_is_loaded(exported, tmp_path, monkeypatch) -> None:
    import kiln.backends.llvm.compiler as compiler

    def fail(*args, **kwargs):
        raise AssertionError("object code reached the linker")

    monkeypatch.setattr(compiler, "load_code", fail)
    for blob in _mutations(exported[0].read_bytes()).values():
        path = tmp_path / "bad.kiln"
        path.write_bytes(blob)
        with pytest.raises(ArtifactError):
            kiln.load(path)


def test_missing_file_is_a_kiln_error(tmp_path) -> None:
    with pytest.raises(ArtifactError, match="cannot read"):
        kiln.load(tmp_path / "nope.kiln")


def test_torch_tensors_in_compiled_model_still_work(exported) -> None:
    _, arrays, expected = exported
    model, inputs = get_model("lenet5")
    compiled = kiln.compile(model, inputs)
    assert torch.equal(compiled(torch.from_numpy(arrays[0])), torch.from_numpy(expected))

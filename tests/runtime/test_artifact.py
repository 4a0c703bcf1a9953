"""kiln.export / kiln.load: bit-exact round trip, loading without PyTorch, and a corpus of
broken or malicious artifacts that must be refused with a typed error before any code runs."""

from __future__ import annotations

import hashlib
import json
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import kiln
from kiln.runtime.artifact import MAGIC, ArtifactError
from kiln.zoo import ZOO, get_model

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
    # ResNet's batch norms are re-estimated on the data after pruning; BERT has none.
    stats = ["bn stats"] if name == "resnet18_cifar" else []
    assert loaded.manifest["pipeline"] == ["pruned", *stats, "O1", "int8"]


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
LEAD = PREFIX.size + 32   # prefix, then the header's SHA-256


def _split(raw: bytes) -> tuple[dict, bytes]:
    _, _, n = PREFIX.unpack_from(raw)
    header = json.loads(raw[LEAD:LEAD + n])
    return header, raw[LEAD + n:LEAD + n + header["data_bytes"]]


def _seal(head: bytes, fmt: int = 2, magic: bytes = MAGIC) -> bytes:
    """Prefix, digest and header: what someone who edits a header and recomputes every
    checksum writes."""
    return PREFIX.pack(magic, fmt, len(head)) + hashlib.sha256(head).digest() + head


def _join(header: dict, data: bytes, fmt: int = 2, magic: bytes = MAGIC) -> bytes:
    return _seal(json.dumps(header).encode(), fmt, magic) + data


def _relayout(header: dict, blobs: dict[str, bytes]) -> bytes:
    """An artifact with the parts ``blobs`` (checksums, offsets and data_bytes recomputed)."""
    h = json.loads(json.dumps(header))
    data = b""
    h["parts"] = {}
    for name, blob in blobs.items():
        h["parts"][name] = {"offset": len(data), "size": len(blob),
                            "sha256": hashlib.sha256(blob).hexdigest()}
        data += blob + b"\0" * (-len(blob) % 64)
    h["data_bytes"] = len(data)
    return _join(h, data)


def _blobs(header: dict, data: bytes) -> dict[str, bytes]:
    return {n: data[p["offset"]:p["offset"] + p["size"]] for n, p in header["parts"].items()}


def _elf_sections(code: bytes) -> list[list[int]]:
    shoff, = struct.unpack_from("<Q", code, 0x28)
    shnum, = struct.unpack_from("<H", code, 0x3C)
    return [list(struct.unpack_from("<IIQQQQIIQQ", code, shoff + 64 * i)) for i in range(shnum)]


def _set_section(code: bytes, i: int, field: int, value: int) -> bytes:
    shoff, = struct.unpack_from("<Q", code, 0x28)
    sec = _elf_sections(code)[i]
    sec[field] = value
    out = bytearray(code)
    struct.pack_into("<IIQQQQIIQQ", out, shoff + 64 * i, *sec)
    return bytes(out)


def _code_mutations(header: dict, data: bytes) -> dict[str, bytes]:
    """Object code that is garbage, or damaged where LLVM's linker would trust it, with
    every checksum recomputed."""
    blobs = _blobs(header, data)
    code = blobs["code"]
    secs = _elf_sections(code)
    shstr = secs[struct.unpack_from("<H", code, 0x3E)[0]]
    names = [code[shstr[4] + s[0]:code.index(b"\0", shstr[4] + s[0])].decode() for s in secs]
    rela = next(i for i, s in enumerate(secs) if s[1] == 4)
    text = secs[rela][7]
    out = {}

    def code_as(name: str, new: bytes) -> None:
        out[name] = _relayout(header, {**blobs, "code": new})

    rng = np.random.default_rng(0)
    code_as("random bytes as code", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    code_as("truncated object", code[:len(code) // 2])
    code_as("section past the end", _set_section(code, text, 4, len(code)))
    code_as("section table past the end",
            code[:0x28] + struct.pack("<Q", len(code)) + code[0x30:])
    # A relocation whose offset lies past its section: the linker would write out of bounds.
    r = bytearray(code)
    struct.pack_into("<Q", r, secs[rela][4], secs[text][5] + 4096)
    code_as("relocation outside its section", bytes(r))
    code_as("static constructors", _set_section(code, text, 1, 14))
    # Call system() instead of an OpenMP function: same length name in the string table.
    for lib in (b"omp_get_num_threads\0", b"GOMP_parallel\0", b"memset\0", b"memcpy\0"):
        if lib in code:
            renamed = code.replace(lib, b"system" + b"\0" * (len(lib) - 6), 1)
            code_as("reference to system()", renamed)
            break
    if ".eh_frame" in names:
        e = bytearray(code)
        struct.pack_into("<I", e, secs[names.index(".eh_frame")][4], 1 << 30)
        code_as("unwind record past its section", bytes(e))
    # The signature record edited to agree with an edited header's arena (below) is still
    # compared with everything else; here it disagrees with the real header.
    at = code.index(int.from_bytes(b"KILNSIG1", "little").to_bytes(8, "little"))
    sig = bytearray(code)
    struct.pack_into("<q", sig, at + 16, 0)
    code_as("signature record with arena 0", bytes(sig))
    return out


def _mutations(raw: bytes) -> dict[str, bytes]:
    header, data = _split(raw)
    code = header["parts"]["code"]
    n = PREFIX.unpack_from(raw)[2]
    head = raw[LEAD:LEAD + n]
    out = {}
    out["empty file"] = b""
    out["truncated prefix"] = raw[:10]
    out["truncated header"] = raw[:LEAD + 20]
    out["truncated data"] = raw[:len(raw) - 100]
    out["trailing bytes"] = raw + b"\0" * 64
    out["bad magic"] = b"NOTKILN\0" + raw[8:]
    out["future format"] = _join(header, data, fmt=99)
    out["format 1 (no header digest)"] = PREFIX.pack(MAGIC, 1, n) + head + data
    bad = json.loads(json.dumps(header))
    bad["format"] = 1
    out["format mismatch in header"] = _join(bad, data)
    flipped = bytearray(data)
    flipped[code["offset"] + code["size"] // 2] ^= 0x01
    out["flipped code byte"] = _join(header, bytes(flipped))
    pad = bytearray(data)
    pad[code["offset"] + code["size"]] = 1 if code["size"] % 64 else pad[0]
    if code["size"] % 64:
        out["nonzero padding"] = _join(header, bytes(pad))
    edited = bytearray(raw)
    edited[LEAD + head.index(b'"arena_bytes": ') + len(b'"arena_bytes": ')] = ord("0")
    out["header edited, digest not recomputed"] = bytes(edited)
    out["header length past end"] = PREFIX.pack(MAGIC, 2, len(raw) * 4) + raw[PREFIX.size:]
    out["oversized header length"] = PREFIX.pack(MAGIC, 2, 1 << 40) + raw[PREFIX.size:]
    out["header not json"] = _seal(b"{{{{") + data
    out["header not an object"] = _join([1, 2, 3], data)  # type: ignore[arg-type]
    out["duplicate key"] = _seal(head.replace(b"{", b'{"arena_bytes": 0, ', 1)) + data
    out["NaN in header"] = _seal(head.replace(b"{", b'{"nan_field": NaN, ', 1)) + data

    def edit(name, fn):
        h = json.loads(json.dumps(header))
        fn(h)
        out[name] = _join(h, data)

    edit("offset out of range", lambda h: h["parts"]["code"].update(offset=len(data)))
    edit("negative offset", lambda h: h["parts"]["code"].update(offset=-64))
    edit("size out of range", lambda h: h["parts"]["consts"].update(size=1 << 50))
    edit("overlapping parts", lambda h: h["parts"]["consts"].update(
        offset=code["offset"], size=code["size"], sha256=code["sha256"]))
    edit("data_bytes short", lambda h: h.update(data_bytes=h["data_bytes"] - 64))
    edit("path traversal in part name",
         lambda h: h["parts"].update({"../../etc/passwd": dict(code)}))
    edit("absolute path in input name", lambda h: h["inputs"][0].__setitem__(0, "/etc/passwd"))
    edit("shape product overflow",
         lambda h: h["inputs"][0].__setitem__(2, [1 << 39, 1 << 39, 1 << 39]))
    edit("negative dimension", lambda h: h["outputs"][0].__setitem__(2, [-1, 10]))
    edit("unknown dtype", lambda h: h["inputs"][0].__setitem__(1, "object"))
    edit("huge arena", lambda h: h.update(arena_bytes=1 << 60))
    # Edits that every container check accepts: only the code's signature record refuses them.
    edit("arena_bytes 0", lambda h: h.update(arena_bytes=0))
    edit("output shape [1, 1]", lambda h: h["outputs"][0].__setitem__(2, [1, 1]))
    edit("output shape [1, 1000]", lambda h: h["outputs"][0].__setitem__(2, [1, 1000]))
    edit("smaller input shape", lambda h: h["inputs"][0].__setitem__(2, [1, 1, 16, 16]))
    edit("input dtype", lambda h: h["inputs"][0].__setitem__(1, "f16"))
    edit("one step more", lambda h: h["steps"].append(dict(h["steps"][0])))
    edit("one step less", lambda h: h["steps"].pop())
    edit("missing code part", lambda h: h["parts"].pop("code"))
    edit("foreign architecture", lambda h: h["target"].update(triple="aarch64-unknown-linux"))
    edit("missing cpu feature", lambda h: h["target"].update(
        features=h["target"]["features"] + ",+kiln-imaginary-isa"))
    edit("output copy out of range", lambda h: h.update(output_copies={"0": ["input", 99]}))
    edit("output copy of another shape", lambda h: h.update(output_copies={"0": ["input", 0]}))
    # A pickle where a tensor belongs: a part holding pickle bytes, declared as a tensor of an
    # object dtype (refused), or of a numeric dtype whose size does not match (refused).
    pickled = b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR." + b"\0" * 13
    ph = json.loads(json.dumps(header))
    ph["parts"]["output0"] = {"offset": len(data), "size": len(pickled),
                              "sha256": hashlib.sha256(pickled).hexdigest()}
    pdata = data + pickled + b"\0" * (-len(pickled) % 64)
    ph["data_bytes"] = len(pdata)
    ph["tensors"] = {"output0": {"dtype": "O", "shape": [1], "output": 0}}
    out["pickle as object tensor"] = _join(ph, pdata)
    ph2 = json.loads(json.dumps(ph))
    ph2["tensors"] = {"output0": {"dtype": "f32", "shape": [1000], "output": 0}}
    out["pickle with wrong size"] = _join(ph2, pdata)
    out.update(_code_mutations(header, data))
    return out


def test_every_broken_artifact_is_refused(exported, tmp_path) -> None:
    raw = exported[0].read_bytes()
    mutations = _mutations(raw)
    assert len(mutations) >= 25
    unrefused = []
    for name, blob in mutations.items():
        path = tmp_path / "bad.kiln"
        path.write_bytes(blob)
        try:
            kiln.load(path)
            unrefused.append(name)
        except ArtifactError:
            pass
    assert not unrefused


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


@pytest.mark.parametrize("bad", [None, 3, ["model.kiln"]])
def test_load_of_something_not_a_path_is_a_kiln_error(bad) -> None:
    with pytest.raises(kiln.KilnError, match="path of an artifact"):
        kiln.load(bad)

"""Artifacts under attack: every single-bit flip of a header (as written, and with every
checksum recomputed), signed artifacts that were tampered with, and export paths that must not
be replaced. Each case must be refused with an ArtifactError, or load a model whose every
input to the generated code is unchanged, or give the original outputs."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time

import numpy as np
import pytest

import kiln
from kiln.runtime.artifact import ArtifactError, read_image
from kiln.runtime.artifact import format as artifact_format
from kiln.zoo import get_model

PREFIX = struct.Struct("<8sIQ")
LEAD = PREFIX.size + 32


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    model, inputs = get_model("lenet5")
    compiled = kiln.compile(model, inputs)
    path = kiln.export(compiled, tmp_path_factory.mktemp("hard") / "lenet5.kiln")
    x = inputs[0].numpy()
    return path, compiled, x, compiled(x)


def _fields(image) -> tuple:
    """Everything about an image that the generated code's behaviour depends on."""
    # The target's CPU name and features decide only whether the host may run the code (a
    # refusal); linking uses the triple alone.
    return (bytes(image.object_code), image.const_blob.tobytes(), image.arena_bytes,
            [(d, tuple(s)) for _, d, s in image.inputs],
            [(d, tuple(s)) for _, d, s in image.outputs], sorted(image.output_copies.items()),
            sorted((j, a.dtype.str, a.shape, a.tobytes())
                   for j, a in image.copy_constants.items()),
            len(image.steps), image.target["triple"])


def _flip_all(raw: bytes, lo: int, hi: int, x, expected, reseal: bool) -> dict[str, int]:
    """Flip each bit of raw[lo:hi]; with ``reseal``, recompute the header digest afterwards
    (what an attacker who edits the header does)."""
    base = _fields(read_image(raw)[0])
    n = PREFIX.unpack_from(raw)[2]
    seen = {"refused": 0, "same code inputs": 0, "ran, same output": 0}
    for pos in range(lo, hi):
        for bit in range(8):
            blob = bytearray(raw)
            blob[pos] ^= 1 << bit
            if reseal:
                blob[PREFIX.size:LEAD] = hashlib.sha256(blob[LEAD:LEAD + n]).digest()
            blob = bytes(blob)
            try:
                image, _ = read_image(blob)
            except ArtifactError:
                seen["refused"] += 1
                continue
            if _fields(image) == base:
                seen["same code inputs"] += 1
                continue
            # Something the code sees changed and every check passed: it must still load
            # cleanly and answer exactly as before (or refuse).
            try:
                loaded = kiln.load(blob)
            except ArtifactError:
                seen["refused"] += 1
                continue
            assert np.array_equal(loaded(x), expected), (pos, bit)
            seen["ran, same output"] += 1
    return seen


def test_every_bit_flip_of_the_header_is_refused(lenet) -> None:
    path, _, x, expected = lenet
    raw = path.read_bytes()
    n = PREFIX.unpack_from(raw)[2]
    seen = _flip_all(raw, 0, LEAD + n, x, expected, reseal=False)
    assert sum(seen.values()) == 8 * (LEAD + n) > 8000   # 12-20k, by target
    # The header is sealed by its digest: not one flip of prefix, digest or header gets past.
    assert seen["refused"] == 8 * (LEAD + n), seen


def test_every_bit_flip_of_a_resealed_header_is_harmless(lenet) -> None:
    """The attack of the issue: flip a bit, recompute the checksums. Every result is refused,
    or leaves everything the code depends on unchanged (a kernel's name, a FLOP count), or
    runs with the original outputs."""
    path, _, x, expected = lenet
    raw = path.read_bytes()
    n = PREFIX.unpack_from(raw)[2]
    t0 = time.perf_counter()
    seen = _flip_all(raw, LEAD, LEAD + n, x, expected, reseal=True)
    assert sum(seen.values()) == 8 * n
    assert seen["refused"] > 0.5 * 8 * n, seen
    assert time.perf_counter() - t0 < 600


# ---- signing ---------------------------------------------------------------------------------
ed25519 = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")
serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")


def _pem_files(tmp_path, key, stem: str):
    priv = tmp_path / f"{stem}.pem"
    pub = tmp_path / f"{stem}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture(scope="module")
def signed(lenet, tmp_path_factory):
    _, compiled, x, expected = lenet
    tmp = tmp_path_factory.mktemp("signed")
    key, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    priv, pub = _pem_files(tmp, key, "signer")
    _, other_pub = _pem_files(tmp, other, "other")
    path = kiln.export(compiled, tmp / "signed.kiln", sign_key=priv)
    return path, key, pub, other, other_pub, x, expected


def _resign(raw: bytes, edit, key=None) -> bytes:
    """``raw`` with its header edited by ``edit(header)``, resealed, and signed again with
    ``key`` (or left with its old signature block)."""
    n = PREFIX.unpack_from(raw)[2]
    header = json.loads(raw[LEAD:LEAD + n])
    data = raw[LEAD + n:LEAD + n + header["data_bytes"]]
    block = raw[LEAD + n + header["data_bytes"]:]
    edit(header)
    if key is not None:
        pub = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        header["signed_by"] = hashlib.sha256(pub).hexdigest()[:16]
    head = json.dumps(header).encode()
    lead = PREFIX.pack(artifact_format.MAGIC, 2, len(head)) + hashlib.sha256(head).digest() + head
    if key is not None:
        sig = key.sign(b"kiln artifact signature v1\0" + lead)
        block = artifact_format.SIG_BLOCK.pack(b"KILNSIG\0", 1, pub, sig)
    elif "signed_by" not in header:
        block = b""
    return lead + data + block


def test_signed_artifact_loads_with_its_key(signed) -> None:
    path, key, pub, _, _, x, expected = signed
    for trusted in (pub, [pub], key.public_key(), str(pub)):
        assert np.array_equal(kiln.load(path, trusted_keys=trusted)(x), expected)
    assert np.array_equal(kiln.load(path)(x), expected)   # no policy: loads
    assert kiln.load(path).manifest["signed_by"]


def test_tampered_signed_artifact_is_refused(signed) -> None:
    path, _, pub, _, _, _, _ = signed
    raw = path.read_bytes()
    tampered = {
        "header edited and resealed": _resign(raw, lambda h: h.update(kiln_version="9.9")),
        "signature bytes flipped": raw[:-1] + bytes([raw[-1] ^ 1]),
        "signature removed": raw[:-artifact_format.SIG_BLOCK.size],
    }
    # New code with every checksum recomputed, under the old signature.
    n = PREFIX.unpack_from(raw)[2]
    header = json.loads(raw[LEAD:LEAD + n])
    code = header["parts"]["code"]
    start = LEAD + n + code["offset"]
    body = bytearray(raw)
    body[start + 100] ^= 0xFF

    def new_code(h):
        h["parts"]["code"]["sha256"] = hashlib.sha256(body[start:start + code["size"]]).hexdigest()
    tampered["code changed, checksums recomputed"] = _resign(bytes(body), new_code)
    for name, blob in tampered.items():
        for trusted in (None, pub):
            with pytest.raises(ArtifactError, match="sign"):
                kiln.load(blob, trusted_keys=trusted)
            assert name


def test_only_trusted_signers_load(signed, monkeypatch) -> None:
    path, _, pub, other, other_pub, x, expected = signed
    raw = path.read_bytes()
    with pytest.raises(ArtifactError, match="not a trusted key"):
        kiln.load(path, trusted_keys=[other_pub])
    # Re-signed by someone else: a valid signature, by an untrusted key.
    resigned = _resign(raw, lambda h: None, key=other)
    assert np.array_equal(kiln.load(resigned)(x), expected)
    with pytest.raises(ArtifactError, match="not a trusted key"):
        kiln.load(resigned, trusted_keys=pub)
    # The signature stripped and the header resealed without it: an unsigned artifact.
    unsigned = _resign(raw[:-artifact_format.SIG_BLOCK.size], lambda h: h.pop("signed_by"))
    assert np.array_equal(kiln.load(unsigned)(x), expected)
    with pytest.raises(ArtifactError, match="not signed"):
        kiln.load(unsigned, trusted_keys=pub)
    # A policy for every load.
    monkeypatch.setenv("KILN_TRUSTED_KEYS", str(pub))
    with pytest.raises(ArtifactError, match="not signed"):
        kiln.load(unsigned)
    assert np.array_equal(kiln.load(path)(x), expected)


def test_bad_keys_are_kiln_errors(lenet, tmp_path) -> None:
    path, compiled, _, _ = lenet
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(kiln.KilnError, match="PEM"):
        kiln.export(compiled, tmp_path / "a.kiln", sign_key=tmp_path / "junk.pem")
    with pytest.raises(kiln.KilnError, match="cannot read"):
        kiln.load(path, trusted_keys=tmp_path / "missing.pub")
    with pytest.raises(kiln.KilnError, match="empty"):
        kiln.load(path, trusted_keys=[])
    assert not (tmp_path / "a.kiln").exists()


# ---- export paths ----------------------------------------------------------------------------
def test_export_replaces_only_regular_files(lenet, tmp_path) -> None:
    _, compiled, _, _ = lenet
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "folder").mkdir()
    target = tmp_path / "real.kiln"
    target.write_bytes(b"user data")
    (tmp_path / "link.kiln").symlink_to(target)
    for bad, why in ((fifo, "not a regular file"), (tmp_path / "folder", "directory"),
                     (tmp_path / "link.kiln", "symbolic link")):
        with pytest.raises(kiln.KilnError, match=why):
            kiln.export(compiled, bad, overwrite=True)
    assert os.path.isfile(target) and target.read_bytes() == b"user data"
    assert (tmp_path / "folder").is_dir() and not any((tmp_path / "folder").iterdir())
    assert os.path.exists(fifo) and not os.path.isfile(fifo)
    with pytest.raises(ArtifactError, match="not a regular file"):
        kiln.load(fifo)   # and does not wait for a writer
    with pytest.raises(kiln.KilnError, match="cannot write"):
        kiln.export(compiled, target / "under_a_file.kiln")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "folder", "link.kiln",
                                                          "real.kiln"]


def test_failed_export_leaves_nothing_behind(lenet, tmp_path, monkeypatch) -> None:
    _, compiled, _, _ = lenet
    old = tmp_path / "m.kiln"
    old.write_bytes(b"previous export")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact_format.os, "replace", broken)
    with pytest.raises(kiln.KilnError, match="No space left"):
        kiln.export(compiled, old, overwrite=True)
    assert old.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.kiln"]


def test_existing_file_is_kept_even_if_it_appears_during_export(lenet, tmp_path,
                                                                monkeypatch) -> None:
    _, compiled, _, _ = lenet
    path = tmp_path / "m.kiln"
    real_link = os.link

    def racing_link(src, dst):
        path.write_bytes(b"written meanwhile")
        return real_link(src, dst)

    monkeypatch.setattr(artifact_format.os, "link", racing_link)
    with pytest.raises(kiln.KilnError, match="already exists"):
        kiln.export(compiled, path)
    assert path.read_bytes() == b"written meanwhile"
    assert [p.name for p in tmp_path.iterdir()] == ["m.kiln"]


def test_a_huge_file_is_judged_by_its_header_not_read_whole(lenet, tmp_path) -> None:
    """A 64 GiB (sparse) file with a kiln prefix: refused from its first bytes; reading it
    whole first, as load once did, would exhaust memory."""
    path, _, _, _ = lenet
    raw = path.read_bytes()
    huge = tmp_path / "huge.kiln"
    with open(huge, "wb") as f:
        f.write(raw[:LEAD + 100])
        f.truncate(64 << 30)
    with pytest.raises(ArtifactError, match="digest|truncated|shorter|header"):
        kiln.load(huge)
    edited = bytearray(raw)
    edited[-1] ^= 1   # the last byte of the data: every check before it has passed
    with open(huge, "wb") as f:
        f.write(edited)
        f.truncate(64 << 30)
    with pytest.raises(ArtifactError, match="has 68719476736 bytes"):
        kiln.load(huge)

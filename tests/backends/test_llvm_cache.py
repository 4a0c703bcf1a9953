"""The compile cache: a second compile loads the stored program; damaged entries are refused."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

import kiln
from kiln.zoo import get_model


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> pathlib.Path:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KILN_CACHE", raising=False)
    return tmp_path


def _compile(name="lenet5"):
    model, inputs = get_model(name)
    return model, inputs, kiln.compile(model, inputs, threads=1)


def test_second_compile_loads_the_cached_program(cache_dir) -> None:
    model, inputs, first = _compile()
    assert "optimize" in first.executable.program.timings
    entries = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(entries) == 1
    assert sorted(f.name for f in entries[0].iterdir()) == ["code.o", "consts.bin",
                                                             "kiln-entry", "manifest.json"]
    _, _, second = _compile()
    assert "cache_load" in second.executable.program.timings
    assert torch.equal(first(*inputs), second(*inputs))


def test_damaged_entry_is_ignored_and_rebuilt(cache_dir) -> None:
    model, inputs, first = _compile()
    entry = next(p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    code = entry / "code.o"
    data = bytearray(code.read_bytes())
    data[len(data) // 2] ^= 0xFF
    code.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum of code.o"):
        _, _, second = _compile()
    assert "optimize" in second.executable.program.timings
    with torch.no_grad():
        np.testing.assert_allclose(second(*inputs).numpy(), model(*inputs).numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_cache_can_be_turned_off(cache_dir, monkeypatch) -> None:
    monkeypatch.setenv("KILN_CACHE", "0")
    _compile()
    assert not any(p for p in cache_dir.iterdir())


def test_different_weights_get_different_entries(cache_dir) -> None:
    model, inputs = get_model("mlp")
    kiln.compile(model, inputs, threads=1)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    kiln.compile(model, inputs, threads=1)
    assert len([p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 2


def test_profile_lists_every_kernel_with_its_rate() -> None:
    model, inputs = get_model("lenet5")
    compiled = kiln.compile(model, inputs, threads=1)
    rows = compiled.profile(*inputs, repeat=3)
    assert len(rows) == len(compiled.executable.program.image.steps)
    assert {r.op for r in rows} >= {"conv", "linear", "max_pool"}
    assert all(r.seconds > 0 and r.flops >= 0 for r in rows)
    assert rows == sorted(rows, key=lambda r: -r.seconds)
    with pytest.raises(kiln.KilnError, match="no per-kernel profile"):
        kiln.compile(model, inputs, backend="reference").profile(*inputs)


def test_schedule_switches_are_part_of_the_key() -> None:
    """Any change of the tuning (Winograd off, a vectorizer threshold, a measured algorithm)
    changes the key: a compile under another setting is never served from the cache."""
    from kiln.backends.llvm.cache import cache_key
    from kiln.backends.llvm.compiler import host_target
    from kiln.ir import GraphBuilder, TensorType
    from kiln.passes.tuning import Tuning

    b = GraphBuilder("conv")
    x = b.input("x", TensorType((2, 16, 12, 12)))
    w = b.constant(np.ones((16, 16, 3, 3), np.float32), "w")
    b.output(b.op("conv", [x, w], {"padding": 1}))
    g = b.build()
    before = cache_key(g, host_target())
    assert cache_key(g, host_target(), Tuning()) == before
    for changed in (Tuning(winograd=False), Tuning(max_load_stride=2), Tuning(min_tail_width=4),
                    Tuning().with_conv_algorithms({"conv x[1]": "gemm"})):
        assert cache_key(g, host_target(), changed) not in (None, before)


def test_source_locations_are_not_part_of_the_key(cache_dir) -> None:
    """The same model written in another file, at another line, or typed into `python -`
    gets the same key: a node's source line only names it in error messages. What the code
    computes still changes the key."""
    from kiln.backends.llvm.cache import cache_key
    from kiln.backends.llvm.compiler import host_target
    from kiln.ir import GraphBuilder, TensorType

    def graph(source, alpha=0.1):
        b = GraphBuilder("net")
        x = b.input("x", TensorType((2, 8)))
        w = b.constant(np.ones((4, 8), np.float32), "w")
        y = b.op("linear", [x, w], source=source)
        b.output(b.op("leaky_relu", [y], {"negative_slope": alpha}, source=source))
        return b.build()

    keys = {cache_key(graph(source), host_target())
            for source in (None, "model.py:12 in forward: y = self.fc(x)",
                           "other.py:40 in forward: y = self.fc(x)", "<stdin>:7 in forward")}
    assert len(keys) == 1 and None not in keys
    assert cache_key(graph(None, alpha=0.2), host_target()) not in keys


def _entries(root: pathlib.Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_cache_is_bounded_by_evicting_least_recently_used(cache_dir, monkeypatch) -> None:
    import os
    import time

    from kiln.backends.llvm import cache

    monkeypatch.setattr(cache, "EVICT_INTERVAL", 0.0)  # check on every store
    monkeypatch.setenv("KILN_CACHE_MAX_MB", "1000")
    model, inputs = get_model("mlp")
    keys = []
    for seed in range(3):  # three models: three entries
        torch.manual_seed(seed)
        kiln.compile(type(model)().eval(), inputs, threads=1)
        new = set(_entries(cache_dir)) - set(keys)
        assert len(new) == 1
        keys += new
    sizes = {k: cache._entry_size(cache_dir / k)[1] for k in keys}
    # Make the first entry the most recently used (as loading it does) and the second the
    # least; then bound the cache to the size of two entries and store a fourth.
    now = time.time()
    for k, age in zip(keys, (10, 300, 200)):
        os.utime(cache_dir / k / "manifest.json", (now - age, now - age))
    stale = cache_dir / ".tmp-crashed-writer"
    stale.mkdir()
    (stale / cache.ENTRY_MARKER).write_text("")
    os.utime(stale, (now - 2 * cache.STALE_TMP_SECONDS,) * 2)
    limit = sum(sizes.values()) * 0.9
    monkeypatch.setenv("KILN_CACHE_MAX_MB", str(limit / (1 << 20)))
    torch.manual_seed(3)
    kiln.compile(type(model)().eval(), inputs, threads=1)
    left = _entries(cache_dir)
    # 80% of the bound is reached after the two oldest go: the newest and the most recently
    # used stay.
    assert keys[1] not in left and keys[2] not in left
    assert keys[0] in left and len(left) == 2
    assert not stale.exists()
    # Loading an entry marks it used.
    before = (cache_dir / keys[0] / "manifest.json").stat().st_mtime
    assert cache.load_cached(keys[0]) is not None
    assert (cache_dir / keys[0] / "manifest.json").stat().st_mtime > before


def test_cache_limit_reads_the_environment(monkeypatch) -> None:
    from kiln.backends.llvm import cache

    monkeypatch.setenv("KILN_CACHE_MAX_MB", "1.5")
    assert cache.cache_limit() == int(1.5 * (1 << 20))
    monkeypatch.delenv("KILN_CACHE_MAX_MB")
    assert cache.cache_limit() == cache.DEFAULT_MAX_MB << 20
    monkeypatch.setenv("KILN_CACHE_MAX_MB", "lots")
    with pytest.warns(UserWarning, match="not a number"):
        assert cache.cache_limit() == cache.DEFAULT_MAX_MB << 20


def test_eviction_never_touches_what_kiln_did_not_write(cache_dir, monkeypatch) -> None:
    """KILN_CACHE_MAX_MB=0 in a cache folder that also holds a user's files and folders
    (including ones that look like kiln's: a key-named folder, an old ".tmp-" folder):
    only kiln's own entries go."""
    import os
    import time

    from kiln.backends.llvm import cache

    monkeypatch.setattr(cache, "EVICT_INTERVAL", 0.0)
    model, inputs = get_model("mlp")
    kiln.compile(model, inputs, threads=1)
    (old,) = _entries(cache_dir)
    docs = cache_dir / "Documents"
    docs.mkdir()
    (docs / "thesis.tex").write_text("years of work")
    lookalike = cache_dir / ("ab" * 32)
    lookalike.mkdir()
    (lookalike / "manifest.json").write_text('{"key": "someone else"}')
    user_tmp = cache_dir / ".tmp-mine"
    user_tmp.mkdir()
    (user_tmp / "notes.txt").write_text("keep")
    past = time.time() - 10 * cache.STALE_TMP_SECONDS
    os.utime(user_tmp, (past, past))
    (cache_dir / "loose.txt").write_text("keep")
    monkeypatch.setenv("KILN_CACHE_MAX_MB", "0")
    torch.manual_seed(5)
    kiln.compile(type(model)().eval(), inputs, threads=1)
    assert old not in _entries(cache_dir)              # kiln's old entry was evicted
    assert (docs / "thesis.tex").read_text() == "years of work"
    assert (lookalike / "manifest.json").exists() and (user_tmp / "notes.txt").exists()
    assert (cache_dir / "loose.txt").exists()


def test_a_folder_kiln_did_not_make_is_used_read_only(tmp_path, monkeypatch) -> None:
    """KILN_CACHE_DIR pointed at a folder with the user's files: kiln warns, stores nothing,
    deletes nothing, and still compiles."""
    from kiln.backends.llvm import cache

    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8")
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KILN_CACHE_MAX_MB", "0")
    monkeypatch.delenv("KILN_CACHE", raising=False)
    monkeypatch.setattr(cache, "_warned_roots", set())
    model, inputs = get_model("mlp")
    with pytest.warns(UserWarning, match="read-only"):
        compiled = kiln.compile(model, inputs, threads=1)
    assert compiled(*inputs).shape
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.jpg"]


@pytest.mark.parametrize("manifest", ["[]", "null", "1e999", "[" * 100000 + "]" * 100000,
                                      '{"format": 1, "key": "K", "sha256": []}',
                                      '{"format": 1, "key": "K", "sha256": {"code.o": 5}}'])
def test_any_broken_manifest_means_recompile(cache_dir, manifest) -> None:
    model, inputs, first = _compile()
    (entry,) = [cache_dir / k for k in _entries(cache_dir)]
    (entry / "manifest.json").write_text(manifest.replace("K", entry.name))
    with pytest.warns(UserWarning, match="damaged cache entry"):
        _, _, second = _compile()
    assert "optimize" in second.executable.program.timings
    assert torch.equal(first(*inputs), second(*inputs))


def test_entries_others_can_write_are_not_loaded(cache_dir) -> None:
    """An entry is native code: one writable by others (or, as root can arrange, owned by
    another user) is compiled afresh instead of loaded."""
    import os

    model, inputs, first = _compile()
    (entry,) = [cache_dir / k for k in _entries(cache_dir)]
    os.chmod(entry, 0o777)
    with pytest.warns(UserWarning, match="not trusted"):
        _, _, second = _compile()
    assert "optimize" in second.executable.program.timings
    os.chmod(entry, 0o700)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        os.chown(entry, 65534, 65534)
        with pytest.warns(UserWarning, match="another user"):
            _, _, third = _compile()
        assert "optimize" in third.executable.program.timings


@pytest.mark.parametrize("raw", ["inf", "nan", "-5", "lots"])
def test_bad_cache_limits_fall_back_to_the_default(monkeypatch, raw) -> None:
    from kiln.backends.llvm import cache

    monkeypatch.setenv("KILN_CACHE_MAX_MB", raw)
    with pytest.warns(UserWarning, match="KILN_CACHE_MAX_MB"):
        assert cache.cache_limit() == cache.DEFAULT_MAX_MB << 20


def test_a_cache_from_an_older_kiln_is_adopted(tmp_path, monkeypatch) -> None:
    """A cache folder written by kiln before the tag existed (entries whose manifests name
    their keys, the eviction stamp) is kiln's: tagged and used, with no warning."""
    import json
    import warnings

    from kiln.backends.llvm import cache

    old = tmp_path / "cache"
    entry = old / ("0f" * 32)
    entry.mkdir(parents=True)
    (entry / "manifest.json").write_text(json.dumps({"key": entry.name}))
    (old / ".last-evict").write_text("")
    monkeypatch.setenv("KILN_CACHE_DIR", str(old))
    monkeypatch.delenv("KILN_CACHE", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.writable_root(old)
    assert (old / cache.ROOT_TAG).is_file()
    (old / cache.ROOT_TAG).unlink()
    (old / "mine.txt").write_text("not kiln's")
    monkeypatch.setattr(cache, "_warned_roots", set())
    with pytest.warns(UserWarning, match="read-only"):
        assert not cache.writable_root(old)


@pytest.mark.parametrize("edit", ["arena 0", "output [1,1]", "output [1,1000]", "small input",
                                  "extra step", "bad feature string"])
def test_edited_manifest_is_caught_by_the_code_signature_and_recompiled(cache_dir,
                                                                       edit) -> None:
    """A manifest edit that every format check accepts disagrees with the signature record
    in the code (or with the form LLVM takes a target in): the entry is compiled afresh,
    never run with the wrong arena or shapes."""
    import json

    model, inputs, first = _compile()
    (entry,) = [cache_dir / k for k in _entries(cache_dir)]
    m = json.loads((entry / "manifest.json").read_text())
    if edit == "arena 0":
        m["arena_bytes"] = 0
    elif edit == "output [1,1]":
        m["outputs"][0][2] = [1, 1]
    elif edit == "output [1,1000]":
        m["outputs"][0][2] = [1, 1000]
    elif edit == "small input":
        m["inputs"][0][2] = [1, 1, 16, 16]
    elif edit == "extra step":
        m["steps"].append(dict(m["steps"][0]))
    else:
        m["target"]["features"] = "*" + m["target"]["features"][1:]
    (entry / "manifest.json").write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="ignoring cache entry"):
        _, _, second = _compile()
    assert "optimize" in second.executable.program.timings
    assert torch.equal(first(*inputs), second(*inputs))

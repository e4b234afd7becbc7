"""The prepared-model cache: a second load of a GGUF file (or of a checkpoint with ``--quantize``) comes
from disk with every tensor equal and the same greedy tokens; a changed checkpoint, other load options, a
damaged entry or one naming foreign code are never used, and the model is built again."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from factories import hf_model, save_hf
from gguf import GGMLQuantizationType as Q

from qwenkit import env_switch, kernels
from qwenkit.checkpoint import load_model, loader, prepared_cache


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QWENKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(prepared_cache.ENV_SWITCH, raising=False)
    return tmp_path / "cache" / "prepared"


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """Counts the loads that build the model from the checkpoint (not from the cache)."""
    calls: list[int] = []
    real = loader._assign_all

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "_assign_all", counting)
    return calls


@pytest.fixture
def gguf_file(tmp_path, gguf_writer) -> Path:
    model = hf_model("qwen2", hidden_size=128, intermediate_size=256)  # untied: output.weight in the file
    return gguf_writer(tmp_path / "m.gguf", "qwen2", model.config.to_dict(), model.state_dict(), Q.Q4_0)


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters(remove_duplicate=False))
    return named | {n: b for n, b in model.named_buffers(remove_duplicate=False) if b is not None}


def greedy(model: torch.nn.Module, steps: int = 6) -> list[int]:
    ids = torch.tensor([[1, 5, 9, 200, 33]])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(ids)[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process where ``path`` is memory-mapped."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 10
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    ids = torch.tensor([[3, 17, 250, 4, 99, 7]])
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    assert greedy(a) == greedy(b)


def test_second_load_of_a_gguf_comes_from_the_cache_and_computes_the_same(cache, builds, gguf_file):
    first, _ = load_model(gguf_file, progress=False, fast_kernels=True)
    assert len(builds) == 1 and len(list(cache.glob("*.pt"))) == 1
    second, config = load_model(gguf_file, progress=False, fast_kernels=True)
    assert len(builds) == 1  # not built again
    assert config == first.config
    assert_same_model(first, second)
    # the cached tensors are the file's pages (memory-mapped), not a copy
    (entry,) = cache.glob("*.pt")
    biggest = max(tensors(second).values(), key=lambda t: t.nbytes)
    assert any(lo <= biggest.data_ptr() < hi for lo, hi in mapped_ranges(entry))
    if kernels.available():  # each layer's one-call decode weights come back as the layers' own tensors
        layer = second.model.layers[0]
        assert layer.decode_weights is not None
        codes = layer.self_attn.qkv_proj.impl.packed.codes
        assert layer.decode_weights.tensors[2].data_ptr() == codes.data_ptr()


def test_quantize_on_load_is_cached_per_precision(cache, builds, tmp_path):
    path = save_hf(hf_model("qwen2", tie_word_embeddings=True), tmp_path / "hf")
    int8, _ = load_model(path, dtype="bfloat16", quantize="int8", progress=False)
    int4, _ = load_model(path, dtype="bfloat16", quantize="int4", progress=False)
    assert len(builds) == 2 and len(list(cache.glob("*.pt"))) == 2  # two entries, one per precision
    int8_again, _ = load_model(path, dtype="bfloat16", quantize="int8", progress=False)
    int4_again, _ = load_model(path, dtype="bfloat16", quantize="int4", progress=False)
    assert len(builds) == 2
    assert_same_model(int8, int8_again)
    assert_same_model(int4, int4_again)
    assert int4_again.model.embed_tokens.source is int4_again.lm_head  # the tied pair is still one copy


def test_a_bf16_checkpoint_packed_for_the_kernels_is_cached_and_other_floats_are_not(cache, builds, tmp_path):
    """bfloat16 weights are packed into the kernels' tiles at every load: that copy is cached and mapped
    back; float32 (nothing packed) and the plain path (no fast kernels) build as before, uncached."""
    path = save_hf(hf_model("qwen2", tie_word_embeddings=True), tmp_path / "hf")
    first, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    expect_cached = kernels.available()  # without the kernels nothing is packed
    assert len(list(cache.glob("*.pt"))) == int(expect_cached)
    second, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    assert len(builds) == (1 if expect_cached else 2)
    assert_same_model(first, second)
    if expect_cached:
        assert type(second.lm_head).__name__ == "PackedBf16Linear"
        assert second.model.embed_tokens.source is second.lm_head  # the tied pair is still one copy
        (entry,) = cache.glob("*.pt")
        biggest = max(tensors(second).values(), key=lambda t: t.nbytes)
        assert any(lo <= biggest.data_ptr() < hi for lo, hi in mapped_ranges(entry))
    builds.clear()
    load_model(path, dtype="float32", progress=False, fast_kernels=True)
    load_model(path, dtype="bfloat16", progress=False, fast_kernels=False)
    assert len(builds) == 2 and len(list(cache.glob("*.pt"))) == int(expect_cached)


def test_a_gptq_checkpoint_is_cached(cache, builds, tmp_path):
    from qwenkit.cli import main

    src = save_hf(hf_model("qwen2"), tmp_path / "hf")
    out = tmp_path / "gptq"
    assert main(["quantize", str(src), str(out), "-q", "--method", "rtn"]) == 0
    builds.clear()
    first, _ = load_model(out, dtype="bfloat16", progress=False)
    second, _ = load_model(out, dtype="bfloat16", progress=False)
    assert len(builds) == 1
    assert_same_model(first, second)


def test_other_options_or_kernels_miss(cache, builds, gguf_file, monkeypatch):
    load_model(gguf_file, progress=False, dtype="bfloat16")
    load_model(gguf_file, progress=False, dtype="float32")  # another dtype
    monkeypatch.setenv("QWENKIT_KERNELS", "torch")
    plain, _ = load_model(gguf_file, progress=False, dtype="bfloat16")  # another kernel choice
    assert len(builds) == 3 and len(list(cache.glob("*.pt"))) == 3
    again, _ = load_model(gguf_file, progress=False, dtype="bfloat16")
    assert len(builds) == 3
    assert_same_model(plain, again)


def test_a_changed_checkpoint_is_built_again_and_its_old_entry_removed(cache, builds, gguf_file):
    load_model(gguf_file, progress=False)
    old = set(cache.glob("*.pt"))
    st = gguf_file.stat()
    os.utime(gguf_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, newer file
    load_model(gguf_file, progress=False)
    assert len(builds) == 2
    new = set(cache.glob("*.pt"))
    assert len(new) == 1 and not new & old


def damage_tensor_bytes(entry: Path) -> None:
    """Flip one byte well inside the tensor data (the zip's records after the pickle)."""
    data = bytearray(entry.read_bytes())
    at = len(data) // 2
    data[at] ^= 0xFF
    entry.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "garbage"])
def test_a_damaged_entry_is_rebuilt_with_one_line(cache, builds, gguf_file, capfd, damage):
    fresh, _ = load_model(gguf_file, progress=False)
    (entry,) = cache.glob("*.pt")
    if damage == "flipped byte":
        damage_tensor_bytes(entry)
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 3])
    else:
        entry.write_bytes(b"not a torch file")
    capfd.readouterr()
    model, _ = load_model(gguf_file, progress=False)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(builds) == 2
    assert len(err) == 1 and err[0].startswith("qwenkit: rebuilding the prepared-model cache (")
    if damage == "flipped byte":  # only the checksum can see a changed byte of a memory-mapped tensor
        assert "checksum mismatch" in err[0]
    assert_same_model(fresh, model)
    model, _ = load_model(gguf_file, progress=False)  # the rewritten entry is good again
    assert len(builds) == 2 and capfd.readouterr().err == ""


class _Payload:
    """What a planted entry would run if the cache unpickled anything it was handed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_an_entry_naming_foreign_code_is_refused_and_never_run(cache, builds, gguf_file, tmp_path, capfd):
    load_model(gguf_file, progress=False)
    (entry,) = cache.glob("*.pt")
    marker = tmp_path / "ran"
    torch.save({"format": prepared_cache.FORMAT, "model": _Payload(marker)}, entry, pickle_module=pickle)
    load_model(gguf_file, progress=False)
    assert not marker.exists()
    assert len(builds) == 2
    assert "which a prepared model never holds" in capfd.readouterr().err


def test_a_model_of_another_shape_is_refused(cache, builds, gguf_file, tmp_path, gguf_writer, capfd):
    """An entry whose key matches but whose layers have other sizes (never written by qwenkit, but the
    file is not trusted blindly) is refused by the shape check."""
    load_model(gguf_file, progress=False)
    (entry,) = cache.glob("*.pt")
    data = torch.load(entry, weights_only=False)
    data["model"].model.layers[0].mlp.down_proj.in_features += 1
    torch.save(data, entry)
    load_model(gguf_file, progress=False)
    assert len(builds) == 2
    assert "down_proj" in capfd.readouterr().err


@pytest.mark.skipif(not kernels.available(), reason="Q4_0 q/k/v fuse only on qwenkit's CPU kernels")
def test_a_fused_product_of_another_size_is_refused(cache, builds, gguf_file, capfd):
    """A fast load stores q/k/v as one product (``quant.fused``): it is checked against the sum of the
    layers it replaced."""
    load_model(gguf_file, progress=False, fast_kernels=True)
    (entry,) = cache.glob("*.pt")
    data = torch.load(entry, weights_only=False)
    attention = data["model"].model.layers[1].self_attn
    assert attention.qkv_proj.fused_from == ("q_proj", "k_proj", "v_proj")
    attention.qkv_proj.out_features -= 1
    torch.save(data, entry)
    load_model(gguf_file, progress=False, fast_kernels=True)
    assert len(builds) == 2
    assert "the product fused from 'model.layers.1.self_attn.q_proj'" in capfd.readouterr().err


def test_an_unwritable_cache_or_the_switch_only_costs_the_speed_up(tmp_path, monkeypatch, builds, gguf_file):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    monkeypatch.setenv("QWENKIT_CACHE", str(blocker))
    a, _ = load_model(gguf_file, progress=False)
    monkeypatch.setenv("QWENKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(prepared_cache.ENV_SWITCH, "off")
    load_model(gguf_file, progress=False)
    c, _ = load_model(gguf_file, progress=False)
    assert len(builds) == 3 and not (tmp_path / "cache").exists()
    assert_same_model(a, c)


def test_a_misspelt_switch_is_named_and_the_cache_stays_on(cache, builds, gguf_file, monkeypatch, capsys):
    monkeypatch.setattr(env_switch, "_named", set())
    monkeypatch.setenv(prepared_cache.ENV_SWITCH, "of")
    load_model(gguf_file, progress=False)
    load_model(gguf_file, progress=False)
    assert len(builds) == 1 and len(list(cache.glob("*.pt"))) == 1  # the second load came from the cache
    err = capsys.readouterr().err.splitlines()
    named = [line for line in err if "QWENKIT_PREPARED_CACHE=" in line]
    assert named == [
        "qwenkit: QWENKIT_PREPARED_CACHE='of' is not one of 0, 1, false, no, off, on, true, yes; using 'on'"
    ]
    monkeypatch.setenv(prepared_cache.ENV_SWITCH, "OFF")
    load_model(gguf_file, progress=False)
    assert len(builds) == 2


def test_no_entry_when_the_disk_is_nearly_full(cache, builds, gguf_file, monkeypatch):
    monkeypatch.setattr(prepared_cache, "MIN_FREE_BYTES", 1 << 62)
    load_model(gguf_file, progress=False)
    load_model(gguf_file, progress=False)
    assert len(builds) == 2 and not list(cache.glob("*"))


def test_a_killed_writers_temporary_file_is_removed_on_the_next_store(cache, builds, gguf_file):
    cache.mkdir(parents=True)
    crashed, in_progress = cache / "old-entry.pt1234.tmp", cache / "other-entry.pt5678.tmp"
    crashed.write_bytes(b"x" * 1000)
    in_progress.write_bytes(b"y")
    two_hours_ago = os.path.getmtime(crashed) - 2 * 3600
    os.utime(crashed, (two_hours_ago, two_hours_ago))
    load_model(gguf_file, dtype="bfloat16", progress=False, fast_kernels=True)
    assert len(builds) == 1 and list(cache.glob("*.pt"))  # built and stored
    assert not crashed.exists() and in_progress.exists()


def test_the_cache_stays_under_its_size_by_removing_the_least_recently_used(
    cache, builds, tmp_path, gguf_writer, monkeypatch
):
    model = hf_model("qwen2", hidden_size=128, intermediate_size=256)
    files = [
        gguf_writer(tmp_path / f"m{i}.gguf", "qwen2", model.config.to_dict(), model.state_dict(), Q.Q4_0)
        for i in range(3)
    ]
    load_model(files[0], progress=False)
    (a,) = cache.glob("*.pt")
    monkeypatch.setenv(prepared_cache.MAX_SIZE_ENV, str(2.5 * a.stat().st_size / 2**30))  # room for two
    load_model(files[1], progress=False)
    (b,) = set(cache.glob("*.pt")) - {a}
    load_model(files[0], progress=False)  # a hit: a is now used more recently than b
    assert len(builds) == 2
    load_model(files[2], progress=False)
    (c,) = set(cache.glob("*.pt")) - {a, b}
    assert set(cache.glob("*.pt")) == {a, c}  # b, the least recently used, made room
    load_model(files[1], progress=False)  # b again: built, and a is now the oldest
    assert len(builds) == 4 and set(cache.glob("*.pt")) == {b, c}


def test_an_entry_larger_than_the_cache_is_not_written_and_evicts_nothing(
    cache, builds, gguf_file, monkeypatch
):
    load_model(gguf_file, progress=False, dtype="bfloat16")
    (kept,) = cache.glob("*.pt")
    monkeypatch.setenv(prepared_cache.MAX_SIZE_ENV, str(kept.stat().st_size / 2 / 2**30))
    load_model(gguf_file, progress=False, dtype="float32")
    load_model(gguf_file, progress=False, dtype="float32")
    assert len(builds) == 3 and list(cache.glob("*.pt")) == [kept]


@pytest.mark.parametrize("value", ["lots", "-1", "0", "nan", "inf"])
def test_a_bad_cache_size_is_named_and_the_default_used(cache, builds, gguf_file, monkeypatch, capfd, value):
    monkeypatch.setenv(prepared_cache.MAX_SIZE_ENV, value)
    load_model(gguf_file, progress=False)
    err = capfd.readouterr().err
    assert f"{prepared_cache.MAX_SIZE_ENV}={value!r} is not a positive number of GiB; using 20" in err
    assert len(list(cache.glob("*.pt"))) == 1
    load_model(gguf_file, progress=False)
    assert len(builds) == 1


def test_entries_are_written_without_zip_crcs_and_torchs_own_setting_is_kept(cache, builds, gguf_file):
    """The entry's checksum guards its bytes (the flipped-byte case above); torch's CRC-32 of every
    record, a third of the write's time, is left out, for this write only."""
    from torch.utils.serialization import config

    fresh, _ = load_model(gguf_file, progress=False)
    (entry,) = cache.glob("*.pt")
    with zipfile.ZipFile(entry) as z:
        assert {info.CRC for info in z.infolist()} == {0}
    assert config.save.compute_crc32 is True
    model, _ = load_model(gguf_file, progress=False)
    assert len(builds) == 1
    assert_same_model(fresh, model)


@pytest.mark.parametrize("n", [0, 7, 8, 8 * 4096 + 5, 8 * (1 << 20) + 3])
@pytest.mark.parametrize("fill", ["random", "ones"])
def test_the_kernels_checksum_is_numpys(n, fill, monkeypatch):
    """Entries written with the kernels' checksum read where they are off (and back): the same numbers,
    trailing bytes and the sum's wrap past 2^64 (every bit set) included."""
    if not kernels.available():
        pytest.skip("the CPU kernels are not available here")
    g = torch.Generator().manual_seed(n)
    raw = (
        torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
        if fill == "random"
        else torch.full((n,), 255)
    )
    raw = raw.to(torch.uint8)
    got = prepared_cache._sum_and_xor(raw)
    monkeypatch.setattr(prepared_cache.kernel_ops, "loaded", lambda: False)
    want = prepared_cache._sum_and_xor(raw)
    assert got == want
    if fill == "ones" and n >= 16:
        assert want[1] == (2**64 - 1 if (n // 8) % 2 else 0)


def test_the_code_version_follows_every_source_file_the_kernels_headers_included(tmp_path):
    """An edit of Python, C++ or a kernel header (the packings live there) changes the version, so entries
    packed by other code miss; other files do not."""
    (tmp_path / "csrc").mkdir()
    files = [tmp_path / "model.py", tmp_path / "csrc" / "kernels.cpp", tmp_path / "csrc" / "int_packing.h"]
    for f in [*files, tmp_path / "README.txt"]:
        f.write_text("x = 1\n")
    before = prepared_cache._code_version(tmp_path)
    assert prepared_cache._code_version(tmp_path) == before
    (tmp_path / "README.txt").write_text("changed\n")
    assert prepared_cache._code_version(tmp_path) == before
    for i, f in enumerate(files):
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9 * (i + 1)))
        after = prepared_cache._code_version(tmp_path)
        assert after != before, f.name
        before = after
    (tmp_path / "csrc" / "new_tiles.h").write_text("")
    assert prepared_cache._code_version(tmp_path) != before
    package = Path(prepared_cache.__file__).parents[1]
    assert prepared_cache._code_version() == prepared_cache._code_version(package)

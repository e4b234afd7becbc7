"""qwenkit's GGUF header parser against gguf-py's reader (the reference), and the headers it must refuse.

The parser replaced gguf-py's GGUFReader on the load path (5 s against 0.1 s for the bundled model's
header); its output must be gguf-py's value for value, key order included.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from qwenkit.checkpoint import gguf_index
from qwenkit.checkpoint.gguf import GGUFError, read_gguf
from qwenkit.checkpoint.gguf_index import GGUFHeaderError
from qwenkit.default_model import default_model_path

V = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType


def reference(path: Path) -> tuple[dict, list[tuple]]:
    """gguf-py's reading of the header, in the shapes qwenkit's index uses."""
    reader = gguf.GGUFReader(path)
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    tensors = [
        (
            t.name,
            t.tensor_type,
            tuple(int(d) for d in reversed(t.shape.tolist())),
            int(t.data_offset),
            int(t.n_bytes),
        )
        for t in reader.tensors
    ]
    return metadata, tensors


def ours(path: Path) -> tuple[dict, list[tuple]]:
    index = gguf_index._parse(path)
    return index.metadata, [(t.name, t.tensor_type, t.shape, t.offset, t.n_bytes) for t in index.tensors]


def test_the_bundled_model_header_is_gguf_pys_value_for_value() -> None:
    path = default_model_path()
    meta, tensors = ours(path)
    ref_meta, ref_tensors = reference(path)
    assert list(meta) == list(ref_meta)  # same keys, same order
    assert meta == ref_meta
    assert tensors == ref_tensors
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and len(meta["tokenizer.ggml.merges"]) == 48900
    assert all(type(a) is type(b) for a, b in zip(meta.values(), ref_meta.values(), strict=True))


SCALARS = {
    "t.u8": (255, V.UINT8), "t.i8": (-128, V.INT8), "t.u16": (65535, V.UINT16), "t.i16": (-32768, V.INT16),
    "t.u32": (4_000_000_000, V.UINT32), "t.i32": (-2_000_000_000, V.INT32), "t.f32": (0.1, V.FLOAT32),
    "t.u64": (2**64 - 1, V.UINT64), "t.i64": (-(2**63), V.INT64), "t.f64": (0.1, V.FLOAT64),
    "t.bool_true": (True, V.BOOL), "t.bool_false": (False, V.BOOL), "t.str": ("héllo ✓ \x00 end", V.STRING),
    "t.empty_str": ("", V.STRING),
}  # fmt: skip
ARRAYS = {
    "a.u8": ([0, 7, 255], V.UINT8), "a.i8": ([-1, 5], V.INT8), "a.u16": ([1, 65535], V.UINT16),
    "a.i16": ([-2, 3], V.INT16), "a.u32": ([1, 2**32 - 1], V.UINT32), "a.i32": ([-7, 9, 11], V.INT32),
    "a.f32": ([0.5, -1.25, 3.1], V.FLOAT32), "a.u64": ([2**64 - 1], V.UINT64),
    "a.i64": ([-(2**63), 1], V.INT64), "a.f64": ([0.1, 2.5], V.FLOAT64),
    "a.bool": ([True, False, True], V.BOOL),
    "a.str": (["a", "", "Ġthe", "<|im_end|>", "日本"], V.STRING),
}  # fmt: skip


@pytest.fixture
def every_type(tmp_path) -> Path:
    """A file with every value type, arrays of each, a nested array, 64-byte alignment and tensors of
    several block types."""
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_custom_alignment(64)
    for key, (value, vtype) in SCALARS.items():
        w.add_key_value(key, value, vtype)
    for key, (value, vtype) in ARRAYS.items():
        w.add_key_value(key, value, V.ARRAY, sub_type=vtype)
    w.add_key_value("a.nested", [[1, 2], [3]], V.ARRAY)
    w.add_tensor("f32", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.add_tensor("f16", np.ones((4,), np.float16))
    for name, qtype in (("q8", Q.Q8_0), ("q4k", Q.Q4_K)):
        size = gguf.GGML_QUANT_SIZES[qtype][1]
        w.add_tensor(name, np.zeros((3, 2 * size), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_value_type_reads_as_gguf_py_reads_it(every_type) -> None:
    meta, tensors = ours(every_type)
    ref_meta, ref_tensors = reference(every_type)
    nested = meta.pop("a.nested")
    assert nested == [[1, 2], [3]]  # gguf-py flattens nested arrays; qwenkit keeps their shape
    assert ref_meta.pop("a.nested") == [1, 2, 3]
    assert list(meta) == list(ref_meta) and meta == ref_meta
    assert tensors == ref_tensors
    assert meta["general.alignment"] == 64 and all(offset % 64 == 0 for _, _, _, offset, _ in tensors)
    for key, (value, vtype) in {**SCALARS, **ARRAYS}.items():
        if vtype in (V.FLOAT32,):
            continue
        assert meta[key] == value, key
    assert meta["t.f32"] == float(np.float32(0.1)) and meta["a.f32"] == [0.5, -1.25, float(np.float32(3.1))]
    assert [t[:3] for t in tensors] == [
        ("f32", Q.F32, (2, 3)), ("f16", Q.F16, (4,)), ("q8", Q.Q8_0, (3, 64)), ("q4k", Q.Q4_K, (3, 512)),
    ]  # fmt: skip


# Headers written by hand, to damage them in ways no writer would.


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return string(key) + struct.pack("<I", vtype) + payload


def tensor_info(name: str, dims: list[int], qtype: int, offset: int = 0) -> bytes:
    return string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)


def header(
    kvs: list[bytes], tensors: list[bytes] = (), version: int = 3, counts: tuple | None = None
) -> bytes:
    n_tensors, n_kvs = counts or (len(tensors), len(kvs))
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kvs) + b"".join(kvs) + b"".join(tensors)


def parse_bytes(data: bytes):
    return gguf_index._HeaderReader(data).read()


def str_array(items: list[bytes]) -> bytes:
    return struct.pack("<IQ", V.STRING, len(items)) + b"".join(string(s) for s in items)


def test_a_hand_written_header_and_an_empty_array() -> None:
    data = header(
        [
            kv("general.architecture", V.STRING, string("qwen2")),
            kv("e", V.ARRAY, struct.pack("<IQ", V.INT32, 0)),
        ],
        [tensor_info("w", [32, 2], Q.Q8_0, offset=0)],
        version=2,
    )
    index = parse_bytes(data)
    assert index.metadata == {
        "GGUF.version": 2, "GGUF.tensor_count": 1, "GGUF.kv_count": 2,
        "general.architecture": "qwen2", "e": [],
    }  # fmt: skip
    (t,) = index.tensors
    assert (t.name, t.shape, t.n_bytes) == ("w", (2, 32), 2 * 34)
    assert t.offset == -(-len(data) // 32) * 32  # data start: the header's end rounded up to 32


def test_every_cut_of_a_header_is_refused_as_truncated() -> None:
    data = header(
        [
            kv("k", V.STRING, string("value")),
            kv("v", V.ARRAY, str_array([b"x", b"yz", b"\xc4\xa0t"])),
            kv("n", V.ARRAY, struct.pack("<IQ3i", V.INT32, 3, 1, 2, 3)),
            kv("u", V.UINT32, struct.pack("<I", 7)),
        ],
        [tensor_info("w", [32, 2], Q.F16)],
    )
    parse_bytes(data)
    for cut in range(4, len(data)):
        with pytest.raises(GGUFHeaderError, match="truncated"):
            parse_bytes(data[:cut])


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (header([], version=1), "GGUF version 1; qwenkit reads versions 2 and 3"),
        (header([], version=4), "GGUF version 4"),
        (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
        (header([kv("a", V.UINT8, b"\x01"), kv("a", V.UINT8, b"\x02")]), "metadata key a appears twice"),
        (header([kv("odd", 13, b"")]), "odd has value type 13, which GGUF does not define"),
        (header([kv("arr", V.ARRAY, struct.pack("<IQ", 77, 1) + bytes(16))]), r"arr\[0\] has value type 77"),
        (header([kv("tokens", V.ARRAY, str_array([b"ok", b"\xff\xfe"]))]), r"tokens\[1\] is not UTF-8"),
        (header([kv("key", V.STRING, string(b"\xe2\x28"))]), "key is not UTF-8"),
        (header([], [tensor_info("w", [32], 200)]), "tensor w has block type 200, unknown to gguf-py"),
        (header([], [tensor_info("w", [1, 1, 1, 1, 1], Q.F32)]), "w has 5 dimensions; GGUF allows at most 4"),
        (header([], [tensor_info("w", [33, 2], Q.Q8_0)]), "rows of 33 values are not whole Q8_0 blocks"),
        (header([kv("general.alignment", V.UINT32, struct.pack("<I", 48))]), "uint32 power of two, not 48"),
        (header([kv("general.alignment", V.INT32, struct.pack("<i", 32))]), "uint32 power of two"),
        (header([], counts=(0, 2**40)), "cannot fit in the file"),
        (header([kv("big", V.ARRAY, struct.pack("<IQ", V.STRING, 2**60))]), "truncated: big"),
        (header([kv("big", V.ARRAY, struct.pack("<IQ", V.FLOAT64, 2**61))]), "truncated: big"),
    ],
    ids=[
        "v1", "v4", "big-endian", "duplicate-key", "value-type", "item-type", "utf8-item", "utf8-string",
        "block-type", "dims", "whole-blocks", "alignment-48", "alignment-int32", "kv-count", "huge-strings",
        "huge-numbers",
    ],
)  # fmt: skip
def test_damaged_headers_are_refused_with_what_is_wrong(data, words) -> None:
    with pytest.raises(GGUFHeaderError, match=words):
        parse_bytes(data)


def test_read_gguf_names_the_file_and_the_problem(tmp_path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(header([kv("a", V.UINT8, b"\x01"), kv("a", V.UINT8, b"\x02")]))
    with pytest.raises(GGUFError) as info:
        read_gguf(path)
    assert str(info.value) == f"{path}: metadata key a appears twice"
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(short)

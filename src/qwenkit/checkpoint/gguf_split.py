"""GGUF models split into parts by llama.cpp's ``llama-gguf-split`` (and gguf-py's ``--split-max-*``).

Large releases (Qwen2.5-72B-Instruct-GGUF) ship as ``name-00001-of-00003.gguf``, ``name-00002-of-00003.gguf``
and so on. Each part is a whole GGUF file with its own header, tensor table, alignment and data section.
Only the first carries the model's metadata; every part carries ``split.no`` (u16, 0-based),
``split.count`` (u16) and ``split.tensors.count`` (i32, the tensors of all parts together).

Read as llama.cpp's ``llama_model_loader`` reads them: the model is opened by its first part (a later
part is refused, naming the first), the other parts are found next to it by name
(``llama_split_prefix`` / ``llama_split_path``: ``%s-%05d-of-%05d.gguf``), each must say it is the part
its name says, a tensor may be in only one part, and the parts together must hold
``split.tensors.count`` tensors. qwenkit also refuses a part whose ``split.count`` disagrees with the
first's (llama.cpp does not check it). Each tensor remembers its part (``TensorEntry.part``), so its
bytes are read from that part's own memory map.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from qwenkit.checkpoint.gguf_index import GGUFHeaderError, GGUFIndex, read_index

SPLIT_NO = "split.no"  # gguf.Keys.Split.LLM_KV_SPLIT_NO
SPLIT_COUNT = "split.count"
SPLIT_TENSORS_COUNT = "split.tensors.count"
_PART_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


class SplitError(ValueError):
    """A split GGUF that cannot be put together; the message is the whole line, file names included."""


def part_name(prefix: str, no: int, count: int) -> str:
    """llama.cpp's ``llama_split_path``: the name of part ``no`` (0-based) of ``count``."""
    return f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf"


def split_count(metadata: dict[str, Any]) -> int:
    """How many parts the file's model is split into: 1 for a whole file (llama.cpp: split.count > 1)."""
    count = metadata.get(SPLIT_COUNT)
    return count if isinstance(count, int) and count > 1 else 1


def part_files(path: Path) -> list[Path]:
    """The files a model at ``path`` is read from, without opening any: the file itself, and when its
    name is a first part's (``...-00001-of-00003.gguf``), every other part found next to it. For keys
    that must change when any part changes (the prepared cache, a run's record of its model)."""
    m = _PART_NAME.search(path.name)
    if m is None or int(m.group(1)) != 1 or int(m.group(2)) < 2:
        return [path]
    prefix, count = path.name[: m.start()], int(m.group(2))
    others = (path.with_name(part_name(prefix, no, count)) for no in range(1, count))
    return [path, *(p for p in others if p.is_file())]


def model_stem(path: Path) -> str:
    """A model file's name without ``.gguf``, and without ``-00001-of-00003`` for a split one's first part."""
    m = _PART_NAME.search(path.name)
    return path.name[: m.start()] if m is not None else path.stem


def join_parts(path: Path, first: GGUFIndex) -> tuple[GGUFIndex, list[Path]]:
    """The model whose first part is ``path`` (header ``first``, split into more than one file): the first
    part's metadata, the tensors of every part (each with its ``part``), and the parts' paths."""
    metadata = first.metadata
    count, no = split_count(metadata), metadata.get(SPLIT_NO)
    if no != 0:
        which = f"part {no + 1}" if isinstance(no, int) else f"a part (no {SPLIT_NO} key)"
        m = _PART_NAME.search(path.name)
        named = f": {part_name(path.name[: m.start()], 0, count)}" if m is not None else ""
        raise SplitError(
            f"{path}: {which} of a GGUF split into {count} files; pass the first part{named}, "
            "as llama.cpp needs it (it names the model and finds the other parts)"
        )
    suffix = part_name("", 0, count)
    if not path.name.endswith(suffix) or path.name == suffix:
        raise SplitError(
            f"{path}: the first part of a GGUF split into {count} files, but not named ...{suffix} as "
            "llama-gguf-split names it, so its other parts cannot be found; give the parts their names back"
        )
    prefix = path.name[: -len(suffix)]
    paths = [path] + [path.with_name(part_name(prefix, i, count)) for i in range(1, count)]
    tensors = list(first.tensors)
    where = {t.name: 0 for t in tensors}
    for i, part in enumerate(paths[1:], start=1):
        index = _read_part(part, i, count, path)
        for t in index.tensors:
            if t.name in where:
                raise SplitError(
                    f"{part}: tensor {t.name} is also in {paths[where[t.name]].name}; each tensor of a split "
                    "GGUF is in one part only"
                )
            where[t.name] = i
            tensors.append(dataclasses.replace(t, part=i))
    expected = metadata.get(SPLIT_TENSORS_COUNT)
    if expected != len(tensors):
        raise SplitError(
            f"{path}: {SPLIT_TENSORS_COUNT} says the {count} parts hold {expected} tensors, but they hold "
            f"{len(tensors)}; download the parts again"
        )
    return GGUFIndex(metadata, tensors), paths


def _read_part(part: Path, i: int, count: int, first: Path) -> GGUFIndex:
    """Part ``i`` (0-based) of ``count``'s header, checked to be that part of ``first``'s split."""
    if not part.is_file():
        raise SplitError(
            f"{part}: no such file: part {i + 1} of the {count} parts of {first.name} is missing"
        )
    try:
        index = read_index(part)
    except GGUFHeaderError as e:
        raise SplitError(f"{part}: part {i + 1} of {count} of a split GGUF: {e}") from None
    no, its_count = index.metadata.get(SPLIT_NO), index.metadata.get(SPLIT_COUNT)
    if not isinstance(no, int):
        raise SplitError(
            f"{part}: not a part of a split GGUF (no {SPLIT_NO} key), yet named part {i + 1} of {count}"
        )
    if no != i:
        raise SplitError(
            f"{part}: {SPLIT_NO} says it is part {no + 1}, but it is named part {i + 1} of {count}"
        )
    if its_count != count:
        raise SplitError(
            f"{part}: {SPLIT_COUNT} says the model is split into {its_count} files, "
            f"but its first part says {count}"
        )
    return index

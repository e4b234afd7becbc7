"""Import direction: model/ imports neither engine/ nor server/; only `python -m qwenkit` imports cli/."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "qwenkit"


# Side rooms: they use the main line, and the main line does not import them (DESIGN.md).
SIDE_ROOMS = ("qwenkit.quant", "qwenkit.finetune", "qwenkit.convert", "qwenkit.evaluate")
MAIN_LINE = ("model", "engine", "tokenizer", "server", "tools", "generate.py", "chat.py", "text_state.py")


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def imported_names(path: Path) -> set[tuple[str, str]]:
    """(module, name) of every ``from module import name`` in the file, lazy ones included."""
    return {
        (node.module, a.name)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module
        for a in node.names
    }


def main_line_files() -> list[Path]:
    return [
        f
        for part in MAIN_LINE
        for f in ([SRC / part] if part.endswith(".py") else (SRC / part).rglob("*.py"))
    ]


def test_model_does_not_import_engine_or_server():
    for f in (SRC / "model").rglob("*.py"):
        bad = {
            m
            for m in imports_of(f)
            if m.startswith(("qwenkit.engine", "qwenkit.server", "qwenkit.tokenizer"))
        }
        assert not bad, f"{f.relative_to(SRC)} imports {bad}"


def test_engine_knows_no_text():
    for f in (SRC / "engine").rglob("*.py"):
        bad = {
            m
            for m in imports_of(f)
            if m.startswith(("qwenkit.tokenizer", "qwenkit.server", "qwenkit.generate"))
        }
        assert not bad, f"{f.relative_to(SRC)} imports {bad}"


def test_nothing_imports_cli():
    for f in SRC.rglob("*.py"):
        if "cli" in f.relative_to(SRC).parts or f.relative_to(SRC) == Path("__main__.py"):
            continue  # the package's own `python -m qwenkit` is the command, as the console script is
        bad = {m for m in imports_of(f) if m.startswith("qwenkit.cli")}
        assert not bad, f"{f.relative_to(SRC)} imports {bad}"


def test_quant_stays_below_the_user_api():
    """quant/ is a side room of the loader: it may use model and checkpoint, never the layers above."""
    for f in (SRC / "quant").rglob("*.py"):
        bad = {
            m
            for m in imports_of(f)
            if m.startswith(("qwenkit.generate", "qwenkit.engine", "qwenkit.server", "qwenkit.tokenizer"))
        }
        assert not bad, f"{f.relative_to(SRC)} imports {bad}"


def test_server_does_not_import_finetune():
    """finetune/ is a side room: the server answers a missing adapter with qwenkit.errors' type."""
    for f in (SRC / "server").rglob("*.py"):
        bad = {m for m in imports_of(f) if m.startswith("qwenkit.finetune")}
        assert not bad, f"{f.relative_to(SRC)} imports {bad}"


def test_main_line_imports_no_side_room():
    """The engine plans decode calls again through the model's own hook (``transformer.
    refresh_decode_layers``, which ``quant.fused`` fills), and the text layer asks the model whether a
    layer runs its adapter inside (``served_adapters.runs_adapter_inside``), not finetune's LoRALinear."""
    for f in main_line_files():
        bad = {m for m in imports_of(f) if m.startswith(SIDE_ROOMS)}
        assert not bad, f"{f.relative_to(SRC)} imports {bad}"


def test_module_swapping_is_the_models_helper():
    """Putting a module in place of another by name is no part of round-to-nearest quantization: LoRA,
    fusion and the quantizers take it from ``model.modules``."""
    for f in SRC.rglob("*.py"):
        bad = {
            m for m, name in imported_names(f) if name == "replace_module" and m != "qwenkit.model.modules"
        }
        assert not bad, f"{f.relative_to(SRC)} imports replace_module from {bad}"


# The known reaches into the side rooms from below them, each for a reason DESIGN.md's table does not
# spell out (file -> the modules it may import there). A new one should be argued, not slipped in.
REACHES_BELOW = {
    # builds the quantized layers a checkpoint names and applies an adapter (DESIGN.md's exception)
    "checkpoint/loader.py": ("qwenkit.quant", "qwenkit.finetune.adapter_io"),
    # a GGUF file's integer blocks ARE quant.affine's AffineWeight, the one form every kernel takes; the
    # blocks no kernel runs are requantized to int8 with quant.quantizer's float16 scale rounding
    "checkpoint/gguf.py": ("qwenkit.quant.affine",),
    "checkpoint/gguf_tensors.py": ("qwenkit.quant.affine",),
    "checkpoint/gguf_quant.py": ("qwenkit.quant.affine", "qwenkit.quant.quantizer"),
    # lazily, for a GPTQ checkpoint only: quant's one parser of its quantization_config
    "distributed/plan.py": ("qwenkit.quant.gptq_format",),
    # lazily, under --quantize only: quant's one rule for the group size a layer gets
    "memory.py": ("qwenkit.quant.rtn",),
    # a measurement front end counting which kernel each layer runs
    "profile.py": ("qwenkit.quant.dense", "qwenkit.quant.linear"),
}


def test_reaches_into_side_rooms_from_below_are_the_known_few():
    rooms = {"quant", "finetune", "convert", "evaluate", "cli"}
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(SRC)
        if rel.parts[0] in rooms or rel == Path("__main__.py"):
            continue
        allowed = REACHES_BELOW.get(rel.as_posix(), ())
        bad = {m for m in imports_of(f) if m.startswith(SIDE_ROOMS) and not m.startswith(allowed)}
        assert not bad, f"{rel} imports {bad}"

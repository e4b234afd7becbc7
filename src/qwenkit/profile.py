"""Speed and memory per precision, as a model card reports them: ``qwenkit profile``.

Two measurements per precision (float32, bfloat16, int8, int4, or a GPTQ checkpoint's own):

* generation speed: tokens/s generating ``generate`` tokens from a ``context``-token prompt at batch 1,
  greedy, EOS ignored, through the same ``Engine`` the CLI and server use (the first token, which
  carries the prompt's prefill, is not counted);
* peak memory encoding ``encode`` tokens (one prefill forward) and generating ``generate`` tokens: on
  CPU the process's peak resident set size, on CUDA ``torch.cuda.max_memory_allocated``.

Each precision runs in a fresh Python subprocess, so one precision's peak never hides in another's and
allocator caches do not carry over. Loading peaks are excluded on Linux by resetting the peak RSS
(``/proc/self/clear_refs``) once the model is loaded; elsewhere ``ru_maxrss`` includes loading.

With ``tensor_parallel`` N, that subprocess starts N ranks, each loading its shard and running the same
greedy steps (every rank holds the whole logits, so every rank picks the same tokens and their forwards'
collectives pair up); the speed is rank 0's, the weights and peaks the largest rank's.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qwenkit.distributed import TensorParallel
from qwenkit.errors import QwenkitError

PRECISIONS = ("float32", "bfloat16", "float16", "int8", "int4")
# Seconds one precision's subprocess may run (``--timeout``): far above a 7B float32 profile's 2,048
# tokens each way on a CPU, and a bound on a child that hangs (a stuck rank, a deadlock) all the same.
CHILD_TIMEOUT_S = 7200.0
CHECKPOINT = "checkpoint"  # a quantized (GPTQ or GGUF) checkpoint at its own precision


class ProfileError(QwenkitError, ValueError):
    """A profile request qwenkit cannot run (unknown precision, bad token counts, a failed run)."""


@dataclass
class ProfileRow:
    precision: str
    dtype: str
    kernels: dict[str, int] = field(default_factory=dict)
    weight_bytes: int = 0
    tokens_per_second: float = 0.0
    encode_tokens_per_second: float = 0.0
    peak_encode_bytes: int = 0
    peak_generate_bytes: int = 0
    memory_kind: str = "peak RSS"
    baseline_bytes: int = 0  # RSS of the process with torch imported, before the model is loaded
    tensor_parallel: int = 1  # ranks; weight_bytes and the peaks are then per rank (the largest)


def parse_precisions(text: str, quantized_checkpoint: bool) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise ProfileError("--precisions is empty")
    for p in names:
        if p not in (*PRECISIONS, CHECKPOINT):
            raise ProfileError(f"unknown precision {p!r}; choose from {', '.join((CHECKPOINT, *PRECISIONS))}")
        if quantized_checkpoint and p != CHECKPOINT:
            raise ProfileError(f"the model is already quantized; it runs only at its own precision, not {p}")
    return names


def prompt_ids(n: int, vocab: int) -> list[int]:
    """``n`` made-up prompt ids, all inside the vocabulary: ``% min(vocab, 1000) + 1`` reached ``vocab``
    itself on a vocabulary of 1,000 or fewer, and the run failed on a prompt id outside it."""
    return [(7 * i + 11) % min(vocab - 1, 1000) + 1 for i in range(n)]


def _load(model: str, precision: str, dtype: str, device: str, context: int, tensor_parallel=None):
    from qwenkit.checkpoint import load_model

    common = dict(
        device=device, context=context, progress=False, fast_kernels=True, tensor_parallel=tensor_parallel
    )
    if precision in ("int8", "int4"):
        return load_model(model, dtype=dtype, quantize=precision, **common)
    if precision == CHECKPOINT:
        return load_model(model, dtype=dtype, **common)
    # float rows are floats, also for a GGUF file (whose own precision is the CHECKPOINT row)
    return load_model(model, dtype=precision, dequantize=True, **common)


def _gguf_types(path: str) -> list[str]:
    """A GGUF file's weight types, most frequent first (``['Q4_1', 'Q8_0']``), float norms left out."""
    from collections import Counter

    from qwenkit.checkpoint import open_checkpoint

    types = Counter(t for t in open_checkpoint(path).tensor_types.values() if t != "F32")
    return [t for t, _ in types.most_common()] or ["F32"]


def kernel_counts(model: torch.nn.Module) -> dict[str, int]:
    """How many linear layers run each kernel (``QuantizedLinear.kernel``; dense layers by name)."""
    from qwenkit.model.moe import RouterLinear
    from qwenkit.quant.dense import PackedBf16Linear  # quant/ builds the layers; this only reads them
    from qwenkit.quant.linear import QuantizedLinear

    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantizedLinear | PackedBf16Linear):
            name = m.kernel
        elif isinstance(m, RouterLinear):  # MoE routers and shared-expert gates: always float
            product = "qwenkit bf16 tiles" if m.packed is not None else "F.linear"
            name = f"float router {product} ({str(m.weight.dtype).removeprefix('torch.')})"
        elif isinstance(m, torch.nn.Linear):
            name = f"dense F.linear ({str(m.weight.dtype).removeprefix('torch.')})"
        else:
            continue
        # a fused q/k/v or gate/up product (quant.fused) runs each of its checkpoint layers
        counts[name] = counts.get(name, 0) + (len(getattr(m, "fused_from", ())) or 1)
    return counts


def _unique_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class _PeakMemory:
    """Peak RSS (CPU) or peak allocated bytes (CUDA) since the last ``reset``."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.kind = "peak allocated (CUDA)" if self.cuda else "peak RSS"
        self.resettable = self.cuda or self._clear_refs()
        if not self.resettable:
            self.kind += " (incl. loading)"

    @staticmethod
    def _clear_refs() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
            return Path("/proc/self/status").is_file()
        except OSError:
            return False

    def reset(self) -> None:
        gc.collect()
        _malloc_trim()  # hand freed heap (the float weights a quantized load replaced) back to the OS
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.resettable:
            self._clear_refs()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        if self.resettable:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


def _malloc_trim() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def profile_in_process(
    model: str,
    precision: str,
    dtype: str = "auto",
    device: str = "cpu",
    context: int = 1,
    generate: int = 2048,
    encode: int = 2048,
    tensor_parallel: TensorParallel | None = None,
) -> ProfileRow:
    """Measure one precision in this process (``profile`` runs this in a fresh subprocess per precision);
    with ``tensor_parallel``, this rank's share, every rank of the group calling it alike."""
    from qwenkit.engine import Engine, SamplingParams

    baseline = 0 if device.startswith("cuda") else _rss()
    size = max(context + generate, encode) + 1
    loaded, config = _load(model, precision, dtype, device, size, tensor_parallel)
    vocab = config.vocab_size
    memory = _PeakMemory(device)
    engine_dtype = str(loaded.model.norm.weight.dtype).removeprefix("torch.")
    label = precision
    if precision == CHECKPOINT and config.quantization:
        q = config.quantization
        label = f"{q.get('quant_method', 'gptq')} int{q.get('bits')} g{q.get('group_size')}"
    elif precision == CHECKPOINT and str(model).endswith(".gguf"):
        label = "gguf " + "+".join(_gguf_types(model))
    row = ProfileRow(
        label,
        engine_dtype,
        kernel_counts(loaded),
        _unique_bytes(loaded),
        memory_kind=memory.kind,
        baseline_bytes=baseline,
        tensor_parallel=1 if tensor_parallel is None else tensor_parallel.world,
    )
    ids = prompt_ids(max(encode, context), vocab)
    greedy = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    warm = Engine(loaded, max_batch_size=1, max_seq_len=64)
    warm.add_request(ids[:8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while warm.has_unfinished():
        warm.step()
    del warm

    if encode:
        memory.reset()
        engine = Engine(loaded, max_batch_size=1, max_seq_len=encode + 1, prefill_chunk=encode)
        engine.add_request(ids[:encode], greedy)
        start = time.perf_counter()
        engine.step()
        row.encode_tokens_per_second = encode / (time.perf_counter() - start)
        row.peak_encode_bytes = memory.peak()
        del engine
    if generate:
        memory.reset()
        engine = Engine(loaded, max_batch_size=1, max_seq_len=context + generate + 1)
        engine.add_request(ids[:context], SamplingParams(temperature=0, max_tokens=generate, ignore_eos=True))
        engine.step()  # prefill + first token
        start, produced = time.perf_counter(), 0
        while engine.has_unfinished():
            produced += sum(len(o.new_token_ids) for o in engine.step())
        elapsed = time.perf_counter() - start
        row.tokens_per_second = produced / elapsed if produced else 0.0
        row.peak_generate_bytes = memory.peak()
    return row


def profile(
    model: str | Path,
    precisions: list[str],
    dtype: str = "auto",
    device: str = "cpu",
    context: int = 1,
    generate: int = 2048,
    encode: int = 2048,
    isolate: bool = True,
    progress: bool = False,
    tensor_parallel: int = 1,
    timeout_s: float | None = CHILD_TIMEOUT_S,
) -> list[ProfileRow]:
    """One :class:`ProfileRow` per precision, each in a fresh subprocess (unless ``isolate=False``);
    ``progress``: a line on stderr as each starts (the defaults take minutes a precision on a CPU);
    ``tensor_parallel``: ranks the subprocess splits the model over (always isolated); ``timeout_s``:
    how long one precision's subprocess may run (None: no limit), then it and its ranks are stopped."""
    if context < 1 or generate < 0 or encode < 0 or not (generate or encode):
        raise ProfileError(
            "--context must be at least 1, --generate/--encode at least 0, and one of them positive"
        )
    if generate == 1:  # its one token carries the prefill and is not timed: the table showed 0.0 tokens/s
        raise ProfileError(
            "--generate 1 times nothing: the first token carries the prompt's prefill and is not counted; "
            "give 2 or more (or 0 to skip generating)"
        )
    kwargs = dict(
        model=str(model), dtype=dtype, device=device, context=context, generate=generate, encode=encode
    )
    rows, notes = [], set()
    for i, precision in enumerate(precisions):
        if progress:
            print(f"qwenkit profile: {precision} ({i + 1} of {len(precisions)})", file=sys.stderr, flush=True)
        if not isolate and tensor_parallel == 1:
            rows.append(profile_in_process(precision=precision, **kwargs))
            continue
        request = json.dumps({**kwargs, "precision": precision, "ranks": tensor_parallel})
        returncode, stdout, stderr = _run_child(request, precision, timeout_s)
        if returncode != 0:
            raise ProfileError(f"profiling {precision} failed: {_why_failed(returncode, stderr)}")
        rows.append(ProfileRow(**json.loads(stdout.strip().splitlines()[-1])))
        _pass_on_notes(stderr, notes)
    return rows


def _run_child(request: str, precision: str, timeout_s: float | None) -> tuple[int, str, str]:
    """Run one precision's subprocess; past ``timeout_s``, or when this process is interrupted, stop it
    and every process it started (its tensor-parallel ranks: a process group of their own)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import qwenkit.profile as p; p._child()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(request, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        raise ProfileError(
            f"profiling {precision} took over {timeout_s:g} s and was stopped (--timeout sets the limit)"
        ) from None
    except BaseException:  # Ctrl-C reaches only this process: the child's group is its own
        _stop_group(proc)
        raise
    return proc.returncode, stdout, stderr


def _why_failed(returncode: int, stderr: str) -> str:
    """A failed child's cause: its last line, or, killed by a signal, that signal. A child the kernel's
    OOM killer ended (a model too large for the RAM) said "no output", or passed on a note it had printed
    before as if that were the error."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        oom = " (most likely the out-of-memory killer: too little free RAM)" if name == "SIGKILL" else ""
        return f"its process was killed by {name}{oom}"
    last = (stderr.strip().splitlines() or [f"exit status {returncode}, no message"])[-1]
    return last.removeprefix("error: ")  # the child's own prefix, else "error: ... failed: error: ..."


def _stop_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=30)


def _pass_on_notes(stderr: str, said: set[str]) -> None:
    """The child's own lines to the user ("qwenkit: CPU kernels unavailable: ...; using the plain PyTorch
    path", a build announced, a misspelt switch), each once for the whole profile: they say why the
    table names the kernels it does, and every child would say the same."""
    for line in stderr.splitlines():
        if line.startswith("qwenkit: ") and line not in said:
            said.add(line)
            print(line, file=sys.stderr, flush=True)


def _child() -> None:
    request = json.loads(sys.stdin.read())
    ranks = request.pop("ranks", 1)
    try:
        row = profile_in_process(**request) if ranks == 1 else _profile_ranks(request, ranks)
    except QwenkitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(asdict(row)))


def _profile_ranks(request: dict, ranks: int) -> ProfileRow:
    """One precision over ``ranks`` tensor-parallel processes: rank 0's speed, the largest rank's bytes."""
    import tempfile

    from qwenkit.distributed.launch import RankFailedError, run_ranks

    with tempfile.TemporaryDirectory() as out:
        try:
            run_ranks(_profile_rank, ranks, (request, out), device=request["device"], timeout_s=600)
        except RankFailedError as e:
            raise ProfileError(e.detail or str(e)) from None
        rows = [ProfileRow(**json.loads((Path(out) / f"rank{r}.json").read_text())) for r in range(ranks)]
    merged = rows[0]
    for name in ("weight_bytes", "peak_encode_bytes", "peak_generate_bytes", "baseline_bytes"):
        setattr(merged, name, max(getattr(r, name) for r in rows))
    return merged


def _profile_rank(tp: TensorParallel, request: dict, out: str) -> None:
    row = profile_in_process(**request, tensor_parallel=tp)  # an error reaches run_ranks as e.detail
    (Path(out) / f"rank{tp.rank}.json").write_text(json.dumps(asdict(row)))


def markdown(rows: list[ProfileRow], context: int, generate: int, encode: int, device: str) -> str:
    """The model card's two tables (speed, memory) as one markdown table, one row per precision."""
    mib = 2**20
    kind = rows[0].memory_kind if rows else "peak RSS"
    lines = [
        f"| precision | activations | kernels (layers) | weights | tokens/s generating {generate} "
        f"(context {context}) | {kind}, encoding {encode} tokens | {kind}, generating {generate} tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kernels = "; ".join(f"{k} x{n}" for k, n in r.kernels.items())
        speed = f"{r.tokens_per_second:.1f}" if generate else "-"
        enc = _mib(r.peak_encode_bytes) if encode else "-"
        gen = _mib(r.peak_generate_bytes) if generate else "-"
        lines.append(
            f"| {r.precision} | {r.dtype} | {kernels} | {_mib(r.weight_bytes)} | {speed} | {enc} | {gen} |"
        )
    threads = torch.get_num_threads()
    lines.append("")
    note = (
        f"device: {device}, {threads} threads, torch {torch.__version__}; each precision in a fresh process"
    )
    ranks = max((r.tensor_parallel for r in rows), default=1)
    if ranks > 1:
        note += f"; {ranks} tensor-parallel ranks: weights and peaks per rank (the largest)"
    base = max((r.baseline_bytes for r in rows), default=0)
    if base:
        note += f"; peaks include the process itself (about {base / mib:.0f} MiB with torch loaded, no model)"
    lines.append(note)
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 100 * 2**20 else f"{n / 2**20:.2f} MiB"

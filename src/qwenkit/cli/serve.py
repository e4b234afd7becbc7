"""``qwenkit serve``: the OpenAI-compatible server (and web chat page) on one model.

Every option can also come from the environment as ``QWENKIT_<OPTION>`` (``QWENKIT_PORT=8000``,
``QWENKIT_API_KEY_FILE=/run/secrets/key``), which is how container images configure it. On SIGTERM the
server stops taking requests, reports not ready, lets running ones finish within the grace period, and
exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from qwenkit.cli.common import (
    add_model_args,
    add_tensor_parallel_arg,
    gguf_dequantize,
    launched_rank,
    lead_tensor_parallel,
    resolve_model,
    wants_tensor_parallel,
    warn_past_context,
)
from qwenkit.command_parser import CommandParser
from qwenkit.errors import ConfigError
from qwenkit.sigterm import Terminated, terminate_unwinds

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "kib": 2**10,
    "m": 1e6,
    "mb": 1e6,
    "mib": 2**20,
    "g": 1e9,
    "gb": 1e9,
    "gib": 2**30,
    "t": 1e12,
    "tb": 1e12,
    "tib": 2**40,
}


def parse_bytes(text: str, option: str) -> int:
    """'2GiB', '512MB', '1.5g', '1073741824' -> bytes; a refusal names ``option``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(f"{option}: cannot read {text!r} as a size; write it like 2GiB, 512MiB or 1GB")
    return int(float(match.group(1)) * _UNITS[unit])


def _env(name: str, default: object = None) -> object:
    return os.environ.get(f"QWENKIT_{name.upper().replace('-', '_')}", default)


def _env_number(name: str, default: int | float | None, kind: type = int) -> int | float | None:
    """A number from the environment (``QWENKIT_NAME``), or ``default`` where it is unset; a value that
    is not one is refused by name."""
    value = _env(name)
    if value is None or str(value).strip() == "":
        return default
    try:
        return kind(str(value).strip())
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"QWENKIT_{name.upper()} must be {what}, got {value!r}") from None


def _env_items(name: str) -> list[str]:
    """A list option from the environment: items split on whitespace, but a JSON object kept whole (vLLM's
    ``--lora-modules '{"name": "sql", "path": "/adapters/sql"}'``, spaces and all, as argv keeps it)."""
    text, items, at = str(_env(name, "")), [], 0
    decoder = json.JSONDecoder()
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return items
        end = at
        if text[at] == "{":
            with contextlib.suppress(ValueError):  # not JSON: the option's own check names the item
                end = decoder.raw_decode(text, at)[1]
        while end < len(text) and not text[end].isspace():
            end += 1
        items.append(text[at:end])
        at = end


def _env_flag(name: str) -> bool:
    """A switch from the environment: 1/true/yes/on or 0/false/no/off (unset: off)."""
    value = str(_env(name, "")).strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    variable = f"QWENKIT_{name.upper()}"
    raise ConfigError(f"{variable} must be 1/true/yes/on or 0/false/no/off, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="qwenkit serve", description="Serve a model over an OpenAI-compatible API.")
    add_model_args(parser)
    parser.set_defaults(
        model=_env("model"),
        dtype=_env("dtype", "auto"),
        device=_env("device", "cpu"),
        quantize=_env("quantize"),
        adapter=_env("adapter"),
        gguf_dequantize=_env_flag("gguf_dequantize"),
        max_context=_env_number("max_context", None),
        cuda_graphs=False if _env_flag("no_cuda_graphs") else None,
    )
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=_env("host", "127.0.0.1"), help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=_env_number("port", 8000))
    g.add_argument("--api-key", default=_env("api_key"), help="require Authorization: Bearer KEY on /v1")
    g.add_argument("--api-key-file", default=_env("api_key_file"), help="read the API key from this file")
    g.add_argument(
        "--served-model-name",
        default=_env("served_model_name"),
        help="the model name clients use (default: the model's file or directory name)",
    )
    g.add_argument(
        "--allowed-origins",
        nargs="*",
        default=(_env("allowed_origins") or "").split(),
        help="origins allowed to call the API from a browser (CORS is off otherwise)",
    )
    g.add_argument(
        "--request-timeout",
        type=float,
        default=_env_number("request_timeout", None, float),
        help="seconds before a request is stopped and its memory freed",
    )
    g.add_argument(
        "--max-request-size",
        default=_env("max_request_size", "64MiB"),
        help="largest request body taken, e.g. 64MiB (default); larger ones get 413 before being read",
    )
    g.add_argument(
        "--graceful-timeout",
        type=float,
        default=_env_number("graceful_timeout", 30.0, float),
        help="seconds running requests get to finish after SIGTERM",
    )
    e = parser.add_argument_group("engine")
    e.add_argument(
        "--max-batch", type=int, default=_env_number("max_batch", 16), help="requests decoded together"
    )
    e.add_argument(
        "--max-queue",
        type=int,
        default=_env_number("max_queue", 256),
        help="waiting requests before new ones get 429",
    )
    e.add_argument(
        "--kv-cache-memory",
        default=_env("kv_cache_memory"),
        help="KV-cache pool size, e.g. 2GiB (default: every batch row at the full context)",
    )
    e.add_argument(
        "--max-model-len",
        type=int,
        default=_env_number("max_model_len", None),
        help="longest sequence (prompt + output) served, also --max-context (default: the model's context)",
    )
    e.add_argument(
        "--threads",
        type=int,
        default=_env_number("threads", None),
        help="CPU threads for the model's compute (default: PyTorch's, one per core)",
    )
    e.add_argument("--no-prefix-caching", action="store_true", default=_env_flag("no_prefix_caching"))
    e.add_argument(
        "--response-cache",
        type=int,
        default=_env_number("response_cache", 512),
        help="repeated deterministic requests remembered (0: off)",
    )
    e.add_argument(
        "--lora-modules",
        nargs="+",
        metavar="NAME=DIR",
        default=_env_items("lora_modules"),
        help="peft-format LoRA adapters served beside the base model, each chosen by a request's "
        '"model": NAME (vLLM\'s flag, also in its JSON form {"name": ..., "path": ...}; the base model '
        "stays served under its own name)",
    )
    e.add_argument(
        "--allow-runtime-lora",
        action="store_true",
        default=_env_flag("allow_runtime_lora"),
        help="turn on POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's), which read "
        "adapter directories from this machine's disk: set --api-key where others can reach the server",
    )
    e.add_argument(
        "--max-loras",
        type=int,
        default=_env_number("max_loras", None),
        help="hold memory for this many adapters (--lora-modules and loaded ones) from the start, so a "
        "load never stalls running requests; more are refused (vLLM's flag; default: grow as they come)",
    )
    e.add_argument(
        "--max-lora-rank",
        type=int,
        default=_env_number("max_lora_rank", None),
        help="with --max-loras: the highest adapter rank the held memory takes (default 16); higher "
        "ones are refused",
    )
    c = parser.add_argument_group("chat")
    c.add_argument(
        "--default-chat-template-kwargs",
        metavar="JSON",
        default=_env("default_chat_template_kwargs"),
        help="a JSON object passed to the chat template on every chat request, a request's own "
        "chat_template_kwargs winning key by key (vLLM's flag; e.g. "
        "'{\"enable_thinking\": false}' for Qwen3)",
    )
    c.add_argument(
        "--reasoning-parser",
        metavar="NAME",
        default=_env("reasoning_parser"),
        help=f"accepted so vLLM commands run unchanged: {' or '.join(REASONING_PARSERS)} (both the <think> "
        "split qwenkit always makes where the chat template knows <think>)",
    )
    add_tensor_parallel_arg(parser)
    parser.set_defaults(tensor_parallel=_env_number("tensor_parallel", 1))
    return parser


# vLLM's names for the <think>...</think> split, which qwenkit makes wherever the template thinks
REASONING_PARSERS = ("qwen3", "deepseek_r1")


def chat_template_kwargs(text: str | None) -> dict[str, object]:
    """``--default-chat-template-kwargs``: a JSON object, or nothing."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"--default-chat-template-kwargs: {text!r} is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--default-chat-template-kwargs must be a JSON object, got {text!r}")
    if "chat_template" in value:  # the template's choice, not its variable (the tokenizer would take it)
        raise ConfigError(
            "--default-chat-template-kwargs may not hold chat_template: the server renders the model's own "
            "template (its tool_use one where tools are offered)"
        )
    return value


def environment_names() -> dict[str, str]:
    """``QWENKIT_<OPTION>`` variable -> the option's dest, for every option of ``qwenkit serve``: the name
    is the long flag's (``--no-cuda-graphs``: ``QWENKIT_NO_CUDA_GRAPHS``), or the positional's."""
    names = {}
    for action in build_parser()._actions:
        if action.dest == "help":
            continue
        flag = next((o for o in action.option_strings if o.startswith("--")), action.dest)
        names[f"QWENKIT_{flag.removeprefix('--').upper().replace('-', '_')}"] = action.dest
    return names


def lora_modules(items: list[str], served_name: str | None = None) -> dict[str, str]:
    """``--lora-modules`` items -> {name: directory}, each checked. An item is NAME=DIR or, as vLLM also
    takes it, a JSON object ``{"name": ..., "path": ..., "base_model_name": ...}``, whose base (when
    ``served_name`` is known) must be the one model served."""
    modules: dict[str, str] = {}
    for item in items:
        if item.lstrip().startswith("{"):
            name, path = _lora_module_json(item, served_name)
        else:
            name, sep, path = item.partition("=")
            name, path = name.strip(), path.strip()
            if not sep or not name or not path:
                raise ConfigError(f"--lora-modules takes NAME=DIR items, got {item!r}")
        if name in modules:
            raise ConfigError(f"--lora-modules names {name!r} twice")
        if not Path(path).is_dir():
            raise ConfigError(f"--lora-modules {name}: {path} is not a directory")
        modules[name] = path
    return modules


def _lora_module_json(item: str, served_name: str | None) -> tuple[str, str]:
    try:
        spec = json.loads(item)
    except ValueError as e:
        raise ConfigError(f"--lora-modules: {item!r} is not JSON ({e})") from None
    named = isinstance(spec, dict) and all(
        isinstance(spec.get(k), str) and spec[k].strip() for k in ("name", "path")
    )
    if not named:
        raise ConfigError(f'--lora-modules: a JSON item needs "name" and "path" strings, got {item!r}')
    unknown = sorted(set(spec) - {"name", "path", "base_model_name"})
    if unknown:
        raise ConfigError(f"--lora-modules {spec['name']}: unknown key {unknown[0]!r}")
    base = spec.get("base_model_name")
    if base is not None and served_name is not None and base != served_name:
        raise ConfigError(
            f"--lora-modules {spec['name']}: base_model_name {base!r} is not the model served "
            f"({served_name!r}); one server serves one base model"
        )
    return spec["name"].strip(), spec["path"].strip()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    api_key = _check(args)
    try:
        return _main(args, api_key, wants_tensor_parallel(args))
    except Terminated:
        print("stopped by SIGTERM before the server started", file=sys.stderr)
        return 0


def _main(args: argparse.Namespace, api_key: str | None, split: bool) -> int:
    # a taken port fails now, not after the model's load; under torchrun only rank 0 listens
    listener = listen_socket(args.host, args.port) if launched_rank() in (None, 0) else None
    try:
        if split:
            note = f" on {args.tensor_parallel} tensor-parallel ranks"

            def serve_on(llm) -> int:
                return serve(args, api_key, llm, listener, note)

            with terminate_unwinds():  # as below; the ranks still loading are stopped
                return lead_tensor_parallel(args, serve_on, load, server=True)
        # A container's PID 1 never gets a signal it has no handler for: without one, SIGTERM while the
        # model loads, or while the app is made after it (most of a second), was ignored, and the server
        # served and waited for SIGKILL. Once it serves, uvicorn's handlers (put over this one, which
        # they restore) drain.
        with terminate_unwinds():
            return serve(args, api_key, load(args), listener)
    finally:
        if listener is not None:
            listener.close()


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything slow runs; uvicorn listens on it. A port that is taken
    or a host that is not this machine's is a one-line error."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _check(args: argparse.Namespace) -> str | None:
    """Every option checked before a model loads (or a rank starts); returns the API key."""
    api_key = args.api_key
    if args.api_key_file:
        try:
            api_key = Path(args.api_key_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read --api-key-file {args.api_key_file}: {e.strerror}") from None
        if not api_key:
            raise ConfigError(f"--api-key-file {args.api_key_file} is empty")
    if api_key is not None and (bad := next((c for c in api_key if not " " < c < "\x7f"), None)):
        source = f"--api-key-file {args.api_key_file}" if args.api_key_file else "--api-key"
        raise ConfigError(  # no client could send a key the server would take: it reads the header as Latin-1
            f"{source} holds U+{ord(bad):04X}, which an HTTP header cannot carry as it is: use printable "
            "ASCII (openssl rand -hex 32 makes one)"
        )
    for name in ("max_batch", "max_queue", "port"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.port > 65535:
        raise ConfigError(f"--port must be at most 65535, got {args.port}")
    if args.device not in ("cpu", "cuda"):  # QWENKIT_DEVICE skips argparse's choices
        raise ConfigError(f"unknown --device {args.device!r} (QWENKIT_DEVICE); choose cpu or cuda")
    # A negative, zero or NaN timeout would end every request at once, or cut the drain short.
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise ConfigError(
            f"--request-timeout must be a positive number of seconds, got {args.request_timeout}"
        )
    if not 0 <= args.graceful_timeout < float("inf"):
        raise ConfigError(f"--graceful-timeout must be 0 or more seconds, got {args.graceful_timeout}")
    if args.max_model_len is not None and args.max_context is not None:
        raise ConfigError("give --max-model-len or --max-context (the same limit), not both")
    for flag, value in (("--max-model-len", args.max_model_len), ("--max-context", args.max_context)):
        if value is not None and value < 2:
            raise ConfigError(f"{flag} must be at least 2, got {value}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    chat_template_kwargs(args.default_chat_template_kwargs)
    if args.reasoning_parser is not None and args.reasoning_parser not in REASONING_PARSERS:
        raise ConfigError(
            f"unknown --reasoning-parser {args.reasoning_parser!r}; qwenkit takes "
            f"{' or '.join(REASONING_PARSERS)} (the <think> split it makes by itself)"
        )
    if args.kv_cache_memory:
        parse_bytes(args.kv_cache_memory, "--kv-cache-memory")
    if parse_bytes(args.max_request_size, "--max-request-size") < 1:
        raise ConfigError(f"--max-request-size must be at least 1 byte, got {args.max_request_size!r}")
    if args.lora_modules:
        served = lora_modules(args.lora_modules)
        if args.adapter:
            raise ConfigError(
                "give --adapter (every request) or --lora-modules (chosen per request), not both"
            )
        if args.served_model_name in served:
            raise ConfigError(f"--served-model-name {args.served_model_name!r} is also a --lora-modules name")
    if args.allow_runtime_lora and args.adapter:
        raise ConfigError(
            "--allow-runtime-lora serves adapters chosen per request; give them with --lora-modules "
            "rather than --adapter (every request)"
        )
    if args.allow_runtime_lora and args.tensor_parallel > 1 and args.max_loras is None:
        raise ConfigError(
            "--allow-runtime-lora under --tensor-parallel loads adapters into slots every rank holds from "
            "the start: give --max-loras N (and --max-lora-rank R) too"
        )
    if args.max_lora_rank is not None and args.max_loras is None:
        raise ConfigError("--max-lora-rank sizes the memory --max-loras holds; give --max-loras too")
    if args.max_loras is not None:
        if not (args.allow_runtime_lora or args.lora_modules):
            raise ConfigError(
                "--max-loras holds memory for adapters chosen per request; give --lora-modules or "
                "--allow-runtime-lora too"
            )
        for flag, value in (("--max-loras", args.max_loras), ("--max-lora-rank", args.max_lora_rank)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
    return api_key


def runtime_lora_warning(allowed: bool, api_key: str | None) -> str | None:
    """What to tell the operator of a server whose runtime LoRA routes anyone can call."""
    if not allowed or api_key:
        return None
    return (
        "warning: --allow-runtime-lora without --api-key: anyone who can reach this server can make it "
        "read adapter directories from its disk (/v1/load_lora_adapter)"
    )


def max_seq_len(args: argparse.Namespace) -> int | None:
    """The longest sequence served: vLLM's --max-model-len or the other commands' --max-context."""
    return args.max_model_len if args.max_model_len is not None else args.max_context


def load(args: argparse.Namespace, tp=None):
    from qwenkit.generate import LLM

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    llm = LLM.load(
        path,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        max_batch_size=args.max_batch,
        max_seq_len=max_seq_len(args),
        kv_cache_memory=parse_bytes(args.kv_cache_memory, "--kv-cache-memory")
        if args.kv_cache_memory
        else None,
        prefix_caching=not args.no_prefix_caching,
        progress=tp is None or tp.rank == 0,
        tensor_parallel=tp,
        adapter=args.adapter,
        adapters=lora_modules(args.lora_modules) or None,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank or 16,
        dequantize=gguf_dequantize(args, path),
        cuda_graphs=args.cuda_graphs,
    )
    if tp is None or tp.rank == 0:
        warn_past_context(llm, "--max-model-len")
    return llm


def serve(args: argparse.Namespace, api_key: str | None, llm, listener: socket.socket, note: str = "") -> int:
    """Run the HTTP server on a loaded model, on the bound ``listener``, until a shutdown signal; drains,
    then returns 0."""
    try:
        make_server(args, api_key, llm, note).run(sockets=[listener])
    finally:
        llm.close()
    return 0


def make_server(args: argparse.Namespace, api_key: str | None, llm, note: str = ""):
    """The HTTP server on a loaded model (says where it serves), ready to run."""
    import uvicorn

    from qwenkit.checkpoint.gguf_split import model_stem
    from qwenkit.server import ServerConfig, create_app

    path = resolve_model(args.model)
    # a split GGUF is served under its model's name, without the first part's -00001-of-00003
    name = args.served_model_name or (model_stem(path) if path.suffix == ".gguf" else path.name)
    adapters = lora_modules(args.lora_modules, name)
    if name in adapters:
        raise ConfigError(f"the model is served as {name!r}, which is also a --lora-modules name")
    config = ServerConfig(
        lora_modules=tuple(adapters.items()),
        runtime_lora=args.allow_runtime_lora,
        served_model_name=name,
        api_key=api_key,
        allowed_origins=tuple(args.allowed_origins),
        max_queue=args.max_queue,
        request_timeout=float(args.request_timeout) if args.request_timeout else None,
        response_cache_entries=args.response_cache,
        max_request_bytes=parse_bytes(args.max_request_size, "--max-request-size"),
        default_chat_template_kwargs=chat_template_kwargs(args.default_chat_template_kwargs),
    )
    app = create_app(llm, config)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(
        f"serving {name}{note} on http://{args.host}:{args.port} (web chat at /, API at /v1)",
        file=sys.stderr,
    )
    warning = runtime_lora_warning(args.allow_runtime_lora, api_key)
    if warning:
        print(warning, file=sys.stderr)
    return DrainingServer(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level="info",
            timeout_graceful_shutdown=args.graceful_timeout,
        )
    )


class DrainingServer:
    """uvicorn's server, draining on SIGTERM with the listener still open: while requests run, /health
    and new POSTs answer 503 (a load balancer or readiness probe sees "not ready", a client sees a
    retryable refusal rather than "connection refused"); once none runs, or the grace period is nearly
    over, uvicorn stops listening and exits. SIGINT (Ctrl-C at a terminal) and a second signal stop
    listening at once, as uvicorn does, still letting running requests end within the grace period."""

    def __new__(cls, config):
        import uvicorn

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame) -> None:
                state = config.app.state.qwenkit
                first = not state.draining
                if first:
                    # Stop running requests just before uvicorn would cancel them, so each ends with a
                    # clean error event (or a 503) rather than a cancelled task and a logged traceback.
                    grace = config.timeout_graceful_shutdown or 0
                    self.drain_ends = time.perf_counter() + grace
                    state.drain_deadline = self.drain_ends - min(1.0, grace / 2)
                state.draining = True
                if first and sig == signal.SIGTERM and self._busy():
                    threading.Thread(target=self._stop_when_idle, args=(sig, frame), daemon=True).start()
                else:
                    self._stop(sig, frame)

            def _busy(self) -> bool:
                """Requests submitted to the engine, or still being read and tokenized (uvicorn's request
                tasks: a long prompt takes seconds before it counts as submitted)."""
                return bool(config.app.state.qwenkit.active or self.server_state.tasks)

            def _stop_when_idle(self, sig: int, frame) -> None:
                state = config.app.state.qwenkit
                while self._busy() and time.perf_counter() < state.drain_deadline + 1.0:
                    if self.should_exit:  # a second signal stopped it meanwhile
                        return
                    time.sleep(0.05)
                self._stop(sig, frame)

            def _stop(self, sig: int, frame) -> None:
                # uvicorn gives the tasks left its whole timeout again once it stops listening: a client
                # stalled mid-upload would hold a drain that already waited the grace period for twice
                # as long (past terminationGracePeriodSeconds: SIGKILL). It gets what remains of it, and
                # a moment for connections that are closing.
                config.timeout_graceful_shutdown = max(self.drain_ends - time.perf_counter(), 0.5)
                super().handle_exit(sig, frame)
                if sig == signal.SIGTERM and sig in self._captured_signals:
                    self._captured_signals.remove(sig)  # a requested drain exits 0 (uvicorn re-raises it)

        return _Server(config)

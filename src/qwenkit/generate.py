"""The user-level API: load a model once, then generate for one prompt or many, or stream.

This is where text meets token ids: prompts are encoded, tokens are detokenized incrementally (never
half a UTF-8 character), and stop strings end a request. The engine below knows only token ids and is
stepped by one driver thread; every caller (the chat, the server, evaluation) reads its own requests'
streams, so any number of them can share one ``LLM``.
"""

from __future__ import annotations

import asyncio
import numbers
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import torch

from qwenkit import embedding, rerank
from qwenkit.checkpoint import load_model, open_checkpoint
from qwenkit.checkpoint.gguf import GGUFCheckpoint
from qwenkit.checkpoint.loader import CheckpointSource
from qwenkit.config import ModelConfig
from qwenkit.default_model import FALLBACK_SAMPLING, sampling_with_config
from qwenkit.delta_stream import DeltaStream, Stage
from qwenkit.distributed import TensorParallel, local_config
from qwenkit.engine import Engine, PromptTooLongError, SamplingParams, SamplingParamsError
from qwenkit.engine.driver import EngineDriver, RequestStream
from qwenkit.engine.request import RequestId
from qwenkit.errors import ConfigError, GenerationError, NonFiniteLogitsError
from qwenkit.load_args import check_adapter_path, check_load_args, checked_device
from qwenkit.model import Transformer
from qwenkit.model.moe import RouterStats, count_routed_tokens
from qwenkit.prompt_only import check_each
from qwenkit.text_state import Completion, Delta, TextState
from qwenkit.tokenizer import HFTokenizer, Tokenizer, load_tokenizer


def tokenizer_for(source: CheckpointSource | str | Path) -> Tokenizer:
    """The tokenizer that belongs to a checkpoint: its directory's files, or a GGUF's own metadata.

    A path may also be a tokenizer-only directory (tokenizer.json or qwen.tiktoken, no weights).
    """
    if isinstance(source, str | Path):
        if Path(source).suffix != ".gguf":
            return load_tokenizer(source)
        source = open_checkpoint(source)
    if isinstance(source, GGUFCheckpoint):
        # the sampling the file names is its model's defaults, read as a generation_config.json's
        return HFTokenizer(
            source.tokenizer,
            source.tokenizer_config,
            source.sampling_config,
            end_of_generation=source.end_of_generation_ids,
        )
    return load_tokenizer(source.path)


class TextStream:
    """One request's text, as Deltas, read with ``for`` or ``async for``. Closing it early, dropping it
    unread (or a stop string) aborts the request, which frees its KV memory."""

    def __init__(self, stream: RequestStream, state: TextState, owner: object = None) -> None:
        # ``owner``: the LLM, alive while its stream is read (``LLM.load(p).stream(...)`` drops it at once,
        # and an LLM that is collected stops its engine)
        self._stream, self.state, self._owner = stream, state, owner
        # dropped unread (a handler that returned early), it can never be read: its request stops
        # rather than run on to max_tokens holding its KV blocks (a reader's iterator keeps it alive)
        weakref.finalize(self, stream.abandon).atexit = False

    @property
    def request_id(self) -> RequestId:
        return self._stream.request_id

    @property
    def completion(self) -> Completion:
        return self.state.completion

    def abort(self) -> None:
        self._stream.abort()

    def __iter__(self) -> Iterator[Delta]:
        try:
            for out in self._stream:
                delta = self.state.on_output(out)
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            self._stream.abort()  # no-op once finished; stops the request if the reader left early

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            async for out in self._stream:
                delta = self.state.on_output(out)
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            self._stream.abort()


class LLM:
    """A loaded model with its tokenizer, engine and the driver thread that steps the engine."""

    tensor_parallel = False  # one rank of several (``load``): each holds its slices of the weights
    tp: TensorParallel | None = None  # which, and of how many
    path: str | None = None  # the checkpoint ``load`` read, as it was given (the server's model card)

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        kv_cache_tokens: int | None = None,
        prefix_caching: bool = True,
        fallback_sampling: dict[str, object] | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.eos_token_ids = frozenset(model.config.eos_token_ids) | frozenset(tokenizer.stop_token_ids)
        self.engine = Engine(
            model,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            prefill_chunk=prefill_chunk,
            eos_token_ids=tuple(sorted(self.eos_token_ids)),
            kv_cache_tokens=kv_cache_tokens,
            prefix_caching=prefix_caching,
            cuda_graphs=cuda_graphs,
        )
        self.driver = EngineDriver(self.engine)
        # an LLM no longer referenced stops its engine's thread, which held the model until exit (a
        # notebook that loaded another model into the same name kept both)
        self._stop_engine = weakref.finalize(self, self.driver.shutdown)
        self.fallback_sampling = FALLBACK_SAMPLING if fallback_sampling is None else fallback_sampling

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        quantize: str | None = None,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        kv_cache_memory: int | None = None,
        prefix_caching: bool = True,
        progress: bool = True,
        tensor_parallel: TensorParallel | None = None,
        adapter: str | Path | None = None,
        dequantize: bool = False,
        cuda_graphs: bool | None = None,
        adapters: Mapping[str, str | Path] | None = None,
        max_loras: int | None = None,
        max_lora_rank: int = 16,
    ) -> LLM:
        """Load a checkpoint directory or GGUF file (None: the bundled model, as the commands default to
        it). ``kv_cache_memory`` (bytes) sizes the KV pool; by
        default it holds every batch row at the full context. The memory check counts that pool.

        With ``tensor_parallel`` every rank loads its shard and runs its own engine on the same requests
        with the same random state; the logits every rank sees are the same gathered ones, so the engines
        take the same steps in lockstep (``kv_cache_memory`` is then per rank). ``dequantize``: a GGUF
        file's quantized weights as ``dtype`` floats rather than in their own precision. ``cuda_graphs``:
        decode steps as CUDA graphs (None: on for a CUDA device; see ``Engine``). ``adapter``: a LoRA
        adapter every request runs through; ``adapters``: name -> adapter, each request running through
        the one its ``SamplingParams.adapter`` names, or the base model (``load_model``).
        ``max_loras``: hold pairs for that many adapters of rank up to ``max_lora_rank`` from the start
        (vLLM's flags; ``served_adapters.reserve_adapters``), so adapters loaded later
        (:meth:`load_adapter`) never stall the running requests by a rebuild and their memory is
        checked now; more or larger ones are refused. None: grown as adapters come, no limit.
        An argument of the wrong type is a ConfigError naming it, raised before anything is read."""
        from qwenkit.default_model import bundled_sampling, default_model_path

        path = default_model_path() if path is None else path
        device = checked_device(device)
        # each size, as a str or float, failed later with a bare TypeError, some after the load
        sizes = {
            "max_batch_size": max_batch_size,
            "max_seq_len": max_seq_len,
            "kv_cache_memory": kv_cache_memory,
            "max_loras": max_loras,
            "max_lora_rank": max_lora_rank,
        }
        flags = {"prefix_caching": prefix_caching, "dequantize": dequantize, "cuda_graphs": cuda_graphs}
        check_load_args(path, sizes, flags, adapter, adapters)
        if kv_cache_memory is not None and kv_cache_memory < 1:  # was "the KV cache holds 1 tokens"
            raise ConfigError(f"kv_cache_memory must be a positive number of bytes, got {kv_cache_memory}")
        if max_seq_len is not None and max_seq_len < 2:
            raise ConfigError(
                f"max_seq_len must be at least 2 (a prompt token and one to generate), got {max_seq_len}"
            )
        source = open_checkpoint(path)
        tokenizer = tokenizer_for(source)
        config = ModelConfig.from_hf(source.hf_config)
        seq_len = max_seq_len or config.max_context
        shard = local_config(config, tensor_parallel.world) if tensor_parallel else config
        kv_tokens = _pool_tokens(shard, dtype, device, max_batch_size, seq_len, kv_cache_memory)
        if max_loras is not None and adapter is not None:
            raise ConfigError("adapter slots are for adapters chosen per request, not one every request runs")
        model, _ = load_model(
            source,
            dtype=dtype,
            device=device,
            quantize=quantize,
            context=kv_tokens,
            batch=1,
            progress=progress,
            tensor_parallel=tensor_parallel,
            adapter=adapter,
            dequantize=dequantize,
            fast_kernels=True,
            adapters=adapters,
            reserve_adapters=None if max_loras is None else (max_loras, max_lora_rank),
        )
        llm = cls(
            model,
            tokenizer,
            max_batch_size=max_batch_size,
            max_seq_len=seq_len,
            kv_cache_tokens=kv_tokens,
            prefix_caching=prefix_caching,
            fallback_sampling=bundled_sampling(Path(path)),
            cuda_graphs=cuda_graphs,
        )
        llm.tensor_parallel = tensor_parallel is not None
        llm.tp = tensor_parallel
        llm.path = str(path)
        return llm

    def close(self) -> None:
        """Stop the engine's thread: requests still running end with finish_reason "abort", and a later
        request raises. That thread holds the engine, model and KV pool; an ``LLM`` no longer referenced
        (its streams included) stops it as it is collected."""
        self._stop_engine()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def model_config(self) -> ModelConfig:
        return self.config

    def default_params(self, **overrides: object) -> SamplingParams:
        """Sampling defaults from generation_config.json, overridden by the caller's values (None: unset).

        A generation_config.json that leaves values out gets transformers' defaults for them (greedy
        unless ``do_sample`` is true). A GGUF file's ``general.sampling.*`` keys are read as such a file
        (``GGUFCheckpoint.sampling_config``), as llama.cpp samples with them. A model with neither (a
        GGUF that names no sampling, say) gets its publisher's recommended settings where qwenkit knows
        them (the bundled model), else moderate chat sampling.
        """
        if not self.tokenizer.has_generation_config:
            defaults = dict(self.fallback_sampling)
        else:
            defaults = sampling_with_config(self.tokenizer.generation_defaults)
        return SamplingParams(**{**defaults, **{k: v for k, v in overrides.items() if v is not None}})

    @property
    def named_max_tokens(self) -> int | None:
        """The answer length the model's files name (generation_config.json's ``max_new_tokens``, Qwen
        v1's 512), if they name one: where a server request asks none, vLLM caps it there, else at the
        context window."""
        if not self.tokenizer.has_generation_config:
            return None
        value = self.tokenizer.generation_defaults.get("max_new_tokens")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def params_or_default(self, params: SamplingParams | None) -> SamplingParams:
        """``params``, or ``default_params()`` for None. Anything else is refused by name: ``params or
        default`` ran a falsy 0 or {} silently on the defaults, and a dict failed later on an attribute."""
        if params is None:
            return self.default_params()
        if not isinstance(params, SamplingParams):
            raise SamplingParamsError(f"params must be a SamplingParams, got {params!r:.60}")
        return params

    def router_stats(self, prompt: str | Sequence[int]) -> RouterStats:
        """Tokens each expert of every MoE layer receives while the model reads ``prompt``.

        One plain forward over the prompt (no engine, so no padding rows are counted), run in the
        engine's thread between two steps: beside a step it counted the step's tokens too (and the
        counter it sets on the shared layers changes the path their steps take). A dense model gives
        empty stats.
        """
        ids = self.encode(prompt)
        # the engine's checks: an id past the vocabulary failed deep in the embedding, with a traceback
        self.engine.validate(ids, SamplingParams())
        device = self.model.model.norm.weight.device

        def count() -> RouterStats:
            with count_routed_tokens(self.model) as stats, torch.no_grad():
                self.model(torch.tensor([ids], device=device))
            return stats

        return self.driver.between_steps(count).result()

    @property
    def adapters(self) -> list[str]:
        """The names of the LoRA adapters served (``SamplingParams.adapter``), in the order loaded."""
        bank = self.engine.adapters
        return [] if bank is None else bank.served

    def load_adapter(self, name: str, path: str | Path, replace: bool = False) -> None:
        """Serve the peft LoRA adapter at ``path`` as ``name`` from now on, beside those served already
        (vLLM's runtime adapter loading). ``replace``: ``name`` is served and takes the new weights;
        requests running on the old ones finish on them. Raises ``AdapterNotFound`` (no adapter at
        ``path``), ``AdapterNotServable`` or ``CheckpointError`` (it does not fit this model), and
        ValueError for a name already served (without ``replace``) or not served (with it) and past the
        slots or rank held (``max_loras``, ``max_lora_rank``: ``AdapterSlotsFull``,
        ``AdapterRankTooHigh``), OutOfMemoryError where it would not fit in the free memory, and
        ConfigError for a ``path`` that is not a str or Path; a refused adapter changes nothing."""
        from qwenkit.checkpoint.loader import servable_adapter

        check_adapter_path(path)
        self._check_adapters_change()
        whole = servable_adapter(self.model, name, path)  # read here, not in the engine's thread
        pairs = whole
        if self.tp is not None:  # this rank's slices; the engine sends the whole to the other ranks
            from qwenkit.checkpoint.loader import shard_adapter

            pairs = shard_adapter(whole, self.tp)
            _check_reserved(self.model, name, pairs)
        _check_adapter_fits(self.model, name, pairs)
        change = lambda: self.engine.add_adapter(name, pairs, replace, whole=whole)  # noqa: E731
        self.driver.between_steps(change).result()

    def unload_adapter(self, name: str) -> None:
        """Stop serving adapter ``name``: requests naming it are refused from now on, those running
        finish. KeyError for a name not served."""
        self._check_adapters_change()
        self.driver.between_steps(lambda: self.engine.remove_adapter(name)).result()

    def _check_adapters_change(self) -> None:
        bank = self.engine.adapters
        if self.tensor_parallel and (bank is None or bank.capacity is None):
            raise ConfigError(
                "under tensor parallelism adapters are loaded only into slots held from the start "
                "(--max-loras): each rank's side paths must come before its layers' collectives"
            )
        from qwenkit.model.served_adapters import runs_adapter_inside

        if runs_adapter_inside(self.model):
            raise ConfigError(
                "this model runs its one adapter inside its layers (it adapts modules that served "
                "adapters cannot: routers, the output head or the embedding), so it "
                "serves no others"
            )

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt's ids: text as the model expects a raw prompt (with the tokenizer's BOS, where it has
        one), token ids as given. A raw prompt is the caller's whole document, so special-token text in it
        is that token, as transformers' ``tokenizer(text)``, vLLM and llama.cpp read it (a ChatML prompt
        written by hand works); chat messages are where text from a user stays text (``chat_prompt``)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode_prompt(prompt, allow_special=True)
        # None or a bare int failed in list() with a TypeError; bytes ran silently as ids (b"hi": [104, 105])
        if isinstance(prompt, bytes | bytearray) or not isinstance(prompt, Sequence):
            raise SamplingParamsError(f"a prompt must be a string or a list of token ids, got {prompt!r:.60}")
        return list(prompt)

    def min_prompt_tokens(self, prompt: str | Sequence[int]) -> int:
        """At least how many ids `encode` makes of a text ``prompt`` (its sequence tokens included), read
        from its UTF-8 length without tokenizing it (`Tokenizer.min_tokens`); 0 for token ids or where
        no bound is known."""
        if not isinstance(prompt, str):
            return 0
        bound = self.tokenizer.min_tokens(prompt, reaching=self.engine.max_seq_len)
        before, after = self.tokenizer.sequence_special_ids
        return bound + len(before) + len(after) if bound else 0

    def check_prompt_bound(self, prompt: str | Sequence[int], params: SamplingParams) -> None:
        """The engine's context refusal (`Engine.validate`) of a text prompt that surely cannot fit, before
        it is tokenized: a 48 MB prompt took 52 s to tokenize before the same refusal."""
        bound, window = self.min_prompt_tokens(prompt), self.engine.max_seq_len
        if bound > window or (bound == window and params.max_tokens != 0):
            message = f"the prompt has at least {bound} tokens; the context window is {window}"
            if params.max_tokens != 0:
                message += (
                    f", and a prompt may take at most {window - 1} to leave room for a token to be generated"
                )
            raise PromptTooLongError(message)

    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: RequestId = None,
        loop: asyncio.AbstractEventLoop | None = None,
        name: str | None = None,
    ) -> TextStream:
        """Start one request now; read its Deltas from the returned stream (``async for`` when ``loop``
        is given). Bad input raises here, before anything runs. ``name``: the id to give it where
        ``request_id`` is None (see ``EngineDriver.submit``)."""
        params = self.params_or_default(params)
        self.check_prompt_bound(prompt, params)
        ids = self.encode(prompt)
        self.engine.validate(ids, params)  # before the text state reads params
        hidden = self.eos_token_ids | frozenset(params.stop_token_ids)
        ending = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        state = TextState(
            self.tokenizer,
            Completion(ids),
            params.stop,
            hidden,
            params.include_stop_str_in_output,
            ending,
            frozenset(params.stop_token_ids),
            params.min_tokens,
        )
        return TextStream(self.driver.submit(ids, params, request_id, loop, name), state, owner=self)

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | None = None,
    ) -> list[Completion]:
        """Generate for many prompts together (continuous batching); results in prompt order.

        Every prompt is checked before any starts, so one bad prompt leaves nothing running.
        """
        if not isinstance(prompts, Sequence):
            raise SamplingParamsError(f"prompts must be a string or a list of prompts, got {prompts!r:.60}")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], numbers.Integral)):  # one prompt
            prompts = [prompts]  # type: ignore[list-item]
        params = self.params_or_default(params)
        # every text that surely cannot fit, before any is tokenized; a refusal names its prompt's index
        check_each(prompts, lambda p: self.check_prompt_bound(p, params), "prompts")
        encoded: list[list[int]] = []
        check_each(prompts, lambda p: encoded.append(self.encode(p)), "prompts")
        check_each(encoded, lambda ids: self.engine.validate(ids, params), "prompts")
        with self.driver.together():  # queued as one batch: the steps never depend on submission speed
            streams = [self.submit(ids, params) for ids in encoded]
        try:
            for stream in streams:
                for _ in stream:
                    pass
                _raise_if_failed(stream.completion)
        finally:
            for stream in streams:
                stream.abort()
        return [stream.completion for stream in streams]

    def embed(
        self,
        inputs: str | Sequence[int] | Sequence[str | Sequence[int]],
        *,
        prompt_name: str | None = None,
        dimensions: int | None = None,
        adapter: str | None = None,
    ) -> list[list[float]]:
        """Embeddings of texts (or token-id lists), in input order: the final-norm hidden state of each
        one's last token, L2-normalized (``embedding``), computed by the engine beside any generation.
        ``prompt_name``: one of the checkpoint's sentence-transformers prompts ("query" for
        Qwen3-Embedding) put before each text; None: its ``default_prompt_name``'s, if it names one (as
        sentence-transformers' ``encode``). ``dimensions``: keep the first ones, then normalize.
        ``adapter``: through this served adapter (``load(adapters=...)``), as ``SamplingParams.adapter``."""
        vectors = self.embed_iter(
            inputs, prompt_name=prompt_name, dimensions=dimensions, adapter=adapter, chunk_size=None
        )
        return list(vectors)

    def embed_iter(
        self,
        inputs: str | Sequence[int] | Sequence[str | Sequence[int]],
        *,
        prompt_name: str | None = None,
        dimensions: int | None = None,
        adapter: str | None = None,
        chunk_size: int | None = 256,
    ) -> Iterator[list[float]]:
        """``embed``'s vectors one by one, computed ``chunk_size`` inputs at a time (None: all together),
        so a corpus of any length holds that many vectors at once. Every input is checked and tokenized
        before this returns, so a refusal comes before any vector is computed."""
        if chunk_size is not None and (type(chunk_size) is not int or chunk_size < 1):
            raise SamplingParamsError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        setup = self.embedding_setup
        embedding.check_dimensions(dimensions, self.config.hidden_size)
        prefix = embedding.prompt_prefix(setup, prompt_name)
        ids = embedding.prompt_ids(self, embedding.check_inputs(inputs), prefix, adapter)
        step = chunk_size or len(ids)

        def vectors() -> Iterator[list[float]]:
            for start in range(0, len(ids), step):
                for hidden in embedding.run(self, ids[start : start + step], adapter):
                    yield embedding.finish(hidden, setup.normalize, dimensions)

        return vectors()

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        instruction: str | None = None,
        *,
        adapter: str | None = None,
    ) -> list[float]:
        """Each document's relevance to ``query`` in [0, 1], in document order: a reranker's (Qwen3-Reranker)
        P("yes") after the model card's prompt (``rerank``), computed by the engine beside any generation.
        ``instruction``: the task the judge is given (the card's web-search one by default)."""
        docs = rerank.check_request(query, documents, instruction)
        ids = rerank.prompt_ids(self, query, docs, instruction, adapter)
        return rerank.run(self, ids, adapter)

    @cached_property
    def embedding_setup(self) -> embedding.EmbeddingSetup:
        """How this checkpoint pools embeddings (``embedding.read_setup``)."""
        return embedding.read_setup(self.path)

    def fim_params(self, params: SamplingParams) -> SamplingParams:
        """``params`` for a fill-in-the-middle answer: they also stop on the tokens that end one
        (``Tokenizer.fim_stop_token_ids``), unless ``ignore_eos``."""
        if params.ignore_eos:
            return params
        extra = self.tokenizer.fim_stop_token_ids - self.eos_token_ids - set(params.stop_token_ids)
        return replace(params, stop_token_ids=(*params.stop_token_ids, *sorted(extra)))

    def infill(self, prefix: str, suffix: str, params: SamplingParams | None = None) -> Completion:
        """The text between ``prefix`` and ``suffix`` as a code model trained for fill-in-the-middle
        (Qwen2.5-Coder, Qwen3-Coder) writes it: the prompt ``Tokenizer.encode_fim`` makes, run with
        ``fim_params``. TokenizerError for a tokenizer without the FIM tokens."""
        ids = self.tokenizer.encode_fim(prefix, suffix)
        return self.generate([ids], self.fim_params(self.params_or_default(params)))[0]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> DeltaStream[Delta]:
        """Text as it is produced, read with ``for`` (or ``async for`` inside a running event loop); the
        final Delta carries the finish reason. The request starts at the first read.

        Leaving early (``break``, ``close()``, Ctrl-C, a cancelled task) aborts the request and frees its
        KV memory. A failed request raises GenerationError.
        """
        return DeltaStream(lambda loop: (self.submit(prompt, params, loop=loop), Stage(_checked)))


def _checked(delta: Delta) -> tuple[Delta]:
    """``delta``; GenerationError where it ends a request that failed."""
    if delta.completion is not None:
        _raise_if_failed(delta.completion)
    return (delta,)


def _check_reserved(model: Transformer, name: str, pairs: dict) -> None:
    """ConfigError unless every module adapter ``name`` adapts holds pairs already (under tensor
    parallelism, where a projection wrapped now would add its update after its layer's all-reduce)."""
    from qwenkit.model.served_adapters import reserved_paths

    for module, path in reserved_paths(model, name, pairs).items():
        if path is None:
            raise ConfigError(
                f"adapter {name!r} adapts {module}, which holds no adapter pairs on this tensor-parallel "
                "model (a MoE layer's routed experts get theirs only when served from the start, with "
                "--lora-modules)"
            )


def _check_adapter_fits(model: Transformer, name: str, pairs: dict) -> None:
    """OutOfMemoryError where serving one more adapter would take more memory than is free."""
    from qwenkit.memory import check_free
    from qwenkit.model.served_adapters import added_bytes

    check_free(
        added_bytes(model, name, pairs),
        model.model.norm.weight.device,
        f"serve adapter {name!r} (its slot in every adapted projection)",
        "unload adapters no longer used first (their slots are reused)",
    )


def _raise_if_failed(completion: Completion) -> None:
    if completion.finish_reason == "error":
        message = completion.error or "generation failed"
        raise (NonFiniteLogitsError if "NaN/inf" in message else GenerationError)(message)


def _pool_tokens(
    config: ModelConfig,
    dtype: str | torch.dtype,
    device: str,
    max_batch_size: int,
    seq_len: int,
    kv_cache_memory: int | None,
) -> int:
    """KV pool size in tokens: from the memory given, else every row at the full context."""
    if kv_cache_memory is None:
        return max_batch_size * seq_len
    from qwenkit.checkpoint.loader import resolve_dtype
    from qwenkit.memory import dtype_bytes

    # the dtype load_model picks for inference (fast_kernels=True there)
    per_token = config.kv_cache_bytes_per_token(dtype_bytes(resolve_dtype(dtype, device, device == "cpu")))
    return max(kv_cache_memory // per_token, 1)

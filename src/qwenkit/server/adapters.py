"""vLLM's runtime LoRA routes: ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.

They read adapter directories from the server's own filesystem, so they exist only where the operator
turned them on (``--allow-runtime-lora``, as vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING), and behind the API
key where one is set. Replies are vLLM's: plain-text success lines, and its 400/404 cases as errors.
"""

from __future__ import annotations

import asyncio

from fastapi.responses import PlainTextResponse

from qwenkit.errors import AdapterNotFound, OutOfMemoryError
from qwenkit.server.errors import APIError
from qwenkit.server.schemas import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from qwenkit.server.state import ServerState

RUNTIME_LORA_OFF = (
    "loading LoRA adapters at run time is off; start the server with --allow-runtime-lora "
    "(or QWENKIT_ALLOW_RUNTIME_LORA=1) to turn it on"
)


async def load_lora_adapter(state: ServerState, body: LoadLoRAAdapterRequest) -> PlainTextResponse:
    _check_enabled(state)
    name, path = body.lora_name, body.lora_path
    if not name or not path:
        raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.", None, "invalid_value")
    if name == state.model_name:
        raise APIError(400, f"'{name}' is the base model's name; give the adapter another", "lora_name")
    async with state.adapters_changing:
        replace = name in state.adapters
        if replace and not body.load_inplace:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")
        try:
            await asyncio.to_thread(state.llm.load_adapter, name, path, replace)
        except AdapterNotFound as e:
            raise APIError(404, str(e), "lora_path", "not_found") from None
        except OutOfMemoryError as e:  # no retry helps until adapters are unloaded
            raise APIError(507, str(e), "lora_path", "insufficient_memory") from None
        except ValueError as e:  # CheckpointError, ConfigError, AdapterNotServable: it does not fit
            raise APIError(400, str(e), "lora_path", "invalid_value") from None
        await asyncio.to_thread(state.serve_adapter, name, path)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(state: ServerState, body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
    _check_enabled(state)
    name = body.lora_name
    if not name:
        raise APIError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "lora_name")
    async with state.adapters_changing:
        if name not in state.adapters:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name", "not_found")
        await asyncio.to_thread(state.llm.unload_adapter, name)
        del state.adapters[name]
        del state.adapter_prints[name]
        state.forget_answers(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _check_enabled(state: ServerState) -> None:
    if not state.config.runtime_lora:
        raise APIError(404, RUNTIME_LORA_OFF, None, "not_found")

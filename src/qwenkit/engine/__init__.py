"""Token-id generation: requests, sampling, KV cache, scheduler, and the step loop."""

from qwenkit.engine.engine import Engine, StepOutput
from qwenkit.engine.request import FinishReason, Request, TokenLogprob
from qwenkit.engine.sampling import PromptTooLongError, SamplingParams, SamplingParamsError

__all__ = [
    "Engine",
    "FinishReason",
    "PromptTooLongError",
    "Request",
    "SamplingParams",
    "SamplingParamsError",
    "StepOutput",
    "TokenLogprob",
]

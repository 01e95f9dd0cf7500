"""ragtop's runtime: the serving engine, its model runners and the onnxruntime plugin
loader (plugin.py). The server imports only what this module exports.

    model = load_model(path)                      # runner + tokenizer + generation config
    engine = AsyncEngine(model.engine(EngineConfig(...))).start()
    async for out in await engine.generate(Request("id", model.encode("Hi"), SamplingParams())):
        ...
"""

from .detokenize import IncrementalDetokenizer, StopStringMatcher
from .engine import (
    MAX_SPECULATIVE_TOKENS,
    SERVED_DENSE_DECODE_TOKENS,
    SERVED_DENSE_PREFILL_TOKENS,
    AsyncEngine,
    CompletionDelta,
    EngineConfig,
    LLMEngine,
    Request,
    RequestOutput,
    TokenLogprob,
    Usage,
)
from .errors import EngineDead, EngineError, InvalidRequest, PromptTooLong, QueueFull, RequestFailed
from .kv_cache import CachePlan, CacheUsage
from .loader import LoadedModel, detect_runner, load_model
from .runners.base import Chunk, ModelRunner, RunnerSpec
from .sampling import MAX_LOGPROBS, SamplingParams
from .scheduler import SchedulerConfig
from .stats import FinishedRequestStats, IterationStats

__all__ = [
    "MAX_LOGPROBS",
    "MAX_SPECULATIVE_TOKENS",
    "SERVED_DENSE_DECODE_TOKENS",
    "SERVED_DENSE_PREFILL_TOKENS",
    "AsyncEngine",
    "CachePlan",
    "CacheUsage",
    "Chunk",
    "CompletionDelta",
    "EngineDead",
    "EngineConfig",
    "EngineError",
    "FinishedRequestStats",
    "IncrementalDetokenizer",
    "InvalidRequest",
    "IterationStats",
    "LLMEngine",
    "LoadedModel",
    "ModelRunner",
    "PromptTooLong",
    "QueueFull",
    "Request",
    "RequestFailed",
    "RequestOutput",
    "RunnerSpec",
    "SamplingParams",
    "SchedulerConfig",
    "StopStringMatcher",
    "TokenLogprob",
    "Usage",
    "detect_runner",
    "load_model",
]

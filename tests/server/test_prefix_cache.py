"""Prefix caching through the server: a follow-up that repeats a conversation's beginning
reports the cached prompt tokens as OpenAI does (usage.prompt_tokens_details.cached_tokens),
the metrics count the lookups and hits, and the answer equals one computed from scratch."""

from __future__ import annotations

import openai

SYSTEM = "State of the Union: the economy, the budget and the people. The quick brown fox."


def ask(url: str, question: str):
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    return client.chat.completions.create(
        model="tiny",
        temperature=0,
        max_tokens=6,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
    )


def test_a_follow_up_reuses_the_cached_prefix_and_answers_the_same(serve):
    warm = serve(served_model_name="tiny")
    first, second = ask(warm.url, "The economy?"), ask(warm.url, "The budget?")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert warm.metric("ragtop:prefix_cache_hits_total") == cached
    assert warm.metric("ragtop:prefix_cache_queries_total") == first.usage.prompt_tokens + second.usage.prompt_tokens
    cold = serve(served_model_name="tiny", prefix_caching=False)
    again = ask(cold.url, "The budget?")
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].message.content == second.choices[0].message.content

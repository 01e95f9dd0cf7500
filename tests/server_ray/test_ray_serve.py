"""ragtop on Ray Serve, for real: a local Ray, 2 replicas, the official openai client through
Ray's HTTP proxy; load sharing, 429 when every replica is full, a killed replica replaced."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

import openai  # noqa: E402


@pytest.fixture(scope="module")
def client(ray_service) -> openai.OpenAI:
    return openai.OpenAI(base_url=ray_service.url + "/v1", api_key="sekrit", max_retries=0)


def test_openai_client_through_the_proxy(client, ray_service):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.usage.completion_tokens == 5
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 4
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 4

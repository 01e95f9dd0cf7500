"""The official openai client against a real uvicorn: completions, chat, streaming, models,
plus the tokenizer routes, /health and /docs."""

from __future__ import annotations

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def test_models(client, live):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].max_model_len == 96  # vLLM's extra field


def test_completion(client):
    r = client.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.finish_reason == "length" and isinstance(choice.text, str)
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    again = client.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert again.choices[0].text == choice.text  # greedy is deterministic


def test_completion_batch_n_logprobs_echo(client):
    r = client.completions.create(
        model="tiny",
        prompt=["one", "two words"],
        n=2,
        max_tokens=3,
        temperature=1.0,
        seed=7,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
        assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    assert r.usage.completion_tokens == 12
    echo = client.completions.create(model="tiny", prompt="Hello there", max_tokens=2, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("Hello there")
    ids = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny", prompt="Numbers", max_tokens=8, temperature=1.0, seed=123, extra_body={"ignore_eos": True})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_stop_string_is_cut(client):
    text = (
        client.completions.create(
            model="tiny", prompt="The", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = text[3:5]
    if not stop.strip():
        pytest.skip("greedy text too short to pick a stop string from")
    r = client.completions.create(
        model="tiny", prompt="The", max_tokens=12, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert text.startswith(r.choices[0].text)


def test_completion_stream_with_usage(client):
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="The quick",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 6
    assert all(c.id == last.id for c in chunks)
    assert body[-1].choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in body)
    whole = client.completions.create(
        model="tiny", prompt="The quick", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert streamed == whole.choices[0].text


def test_raw_sse_framing(live):
    with httpx.stream(
        "POST", live.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_chat(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


def test_chat_stream(client):
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Tell me."}],
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == client.chat.completions.create(**kw).choices[0].message.content


def test_tokenize_detokenize(live):
    with live.client() as c:
        t = c.post("/tokenize", json={"prompt": "The quick brown fox"}).json()
        assert t["count"] == len(t["tokens"]) and t["max_model_len"] == 96
        d = c.post("/detokenize", json={"tokens": t["tokens"]}).json()
        assert d["prompt"].endswith("The quick brown fox")
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
        assert chat["count"] > 3


def test_health_and_docs(live):
    with live.client() as c:
        assert c.get("/health").json() == {"status": "ready"}
        assert c.get("/docs").status_code == 200
        paths = c.get("/openapi.json").json()["paths"]
        assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/metrics"} <= set(paths)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_their_assets_from_this_server(live, page):
    """No CDN: every script, stylesheet and icon the page names is a path on this server, and
    each answers 200 with the packaged file (an offline machine gets a working page)."""
    import re

    with live.client() as c:
        html = c.get(page).text
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
        assert urls, html
        assert not [u for u in urls if "//" in u], f"{page} references another host: {urls}"
        assets = [u for u in urls if u.endswith((".js", ".css", ".png"))]
        assert len(assets) >= 2, urls  # the page's script and (Swagger UI) stylesheet, plus the icon
        for url in assets:
            r = c.get(url)
            assert r.status_code == 200 and len(r.content) > 1000, url
            kind = {"js": "javascript", "css": "text/css", "png": "image/png"}[url.rsplit(".", 1)[1]]
            assert kind in r.headers["content-type"], (url, r.headers["content-type"])
        assert "/openapi.json" in html and c.get("/openapi.json").status_code == 200

"""Self-speculative decoding through a real uvicorn server: the server default
(`--speculative-tokens`), the per-request `num_speculative_tokens`, its validation, streaming,
and the acceptance counters in /metrics. The output is the dense model's greedy output."""

from __future__ import annotations

import dataclasses
import json

import httpx

from ragtop.runtime import EngineConfig, Request, SamplingParams, load_model

PROMPTS = ["The quick brown fox", "State of the Union: the economy", "Numbers 1234567890 and"]


def engine_text(path, prompt: str, max_tokens: int, dense: bool) -> str:
    """The reference, in process: greedy text of the same graph, every chunk flagged dense
    (the dense model) or none (plain sparse decoding)."""
    model = load_model(path, threads=1)
    if dense:
        forward = model.runner.forward
        model.runner.forward = lambda chunks: forward([dataclasses.replace(c, dense=True) for c in chunks])
    eng = model.engine(EngineConfig(context_limit=96))
    out = eng.run_until_done([Request("r", model.encode(prompt), SamplingParams(max_tokens=max_tokens, temperature=0))])
    eng.close()
    return "".join(d.text for o in out["r"] for d in o.deltas)


def complete(url: str, prompt: str, **kw) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 20, "temperature": 0, **kw}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def stream_text(url: str, prompt: str, **kw) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 20, "temperature": 0, "stream": True, **kw}
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


def test_server_default_and_per_request_option(serve, exported):
    live = serve(served_model_name="tiny", speculative_tokens=3)
    path = exported["topk"]
    for prompt in PROMPTS:
        want = engine_text(path, prompt, 20, dense=True)
        r = complete(live.url, prompt)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        assert stream_text(live.url, prompt, num_speculative_tokens=5) == want
    drafted = live.metric("ragtop:spec_decode_num_draft_tokens_total", model_name="tiny")
    accepted = live.metric("ragtop:spec_decode_num_accepted_tokens_total", model_name="tiny")
    assert drafted > 0 and 0 <= accepted <= drafted
    # num_speculative_tokens = 0: plain sparse decoding, nothing drafted
    r = complete(live.url, PROMPTS[0], num_speculative_tokens=0)
    assert r.json()["choices"][0]["text"] == engine_text(path, PROMPTS[0], 20, dense=False)
    assert live.metric("ragtop:spec_decode_num_draft_tokens_total", model_name="tiny") == drafted
    # chat takes the option too
    chat = httpx.post(
        live.url + "/v1/chat/completions",
        timeout=60,
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 8,
            "temperature": 0,
            "num_speculative_tokens": 2,
        },
    )
    assert chat.status_code == 200, chat.text
    # a sampled request speculates too (rejection sampling): seeded, it is reproducible
    seeded = {"temperature": 0.9, "seed": 11, "max_tokens": 12, "ignore_eos": True, "num_speculative_tokens": 3}
    first = complete(live.url, PROMPTS[1], **seeded)
    assert first.status_code == 200, first.text
    assert complete(live.url, PROMPTS[1], **seeded).json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    assert first.json()["usage"]["completion_tokens"] == 12
    assert live.metric("ragtop:spec_decode_num_draft_tokens_total", model_name="tiny") > drafted


def test_bad_values_are_4xx_naming_the_field(serve):
    live = serve(served_model_name="tiny")
    for bad in (-1, 17, "many", 2.5):
        r = complete(live.url, "Hello", num_speculative_tokens=bad)
        assert 400 <= r.status_code < 500, (bad, r.status_code)
        assert "num_speculative_tokens" in r.text
    dense = serve("dense", served_model_name="tiny")
    r = complete(dense.url, "Hello", num_speculative_tokens=2)
    assert r.status_code == 400 and r.json()["error"]["param"] == "num_speculative_tokens"
    assert "needs a sparse" in r.json()["error"]["message"]

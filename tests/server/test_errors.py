"""Each class of bad input gets its status and a message naming the problem, and none of them
disturbs a request already running."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from .conftest import wait_until


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == r.status_code
    return body["error"]


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"prompt": "hi", "temperature": -1}, "temperature", "greater than or equal to 0"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p", "less than or equal to 1"),
        ({"prompt": "hi", "n": 0}, "n", "greater than or equal to 1"),
        ({"prompt": "hi", "logprobs": 50}, "logprobs", "less than or equal to 20"),
        ({"prompt": "hi", "stop": [""]}, "stop", "must not be empty"),
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, None, "stream_options is only allowed"),
        ({"max_tokens": 3}, "prompt", "Field required"),
        ({"prompt": []}, "prompt", "must not be an empty list"),
        ({"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(live, body, param, words):
    r = httpx.post(live.url + "/v1/completions", json=body)
    assert r.status_code == 422
    err = error_of(r)
    assert words in err["message"]
    if param:
        assert err["param"].startswith(param) and err["message"].startswith(param)


def test_chat_invalid_fields(live):
    r = httpx.post(live.url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 422 and error_of(r)["param"] == "messages"
    r = httpx.post(live.url + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 422 and "role" in error_of(r)["param"]


def test_malformed_json_is_422(live):
    r = httpx.post(live.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in error_of(r)["message"]


def test_prompt_longer_than_context_is_400_naming_both_lengths(live):
    prompt = list(range(10, 10 + 150))  # token ids: exactly 150 tokens, the context is 96
    r = httpx.post(live.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    assert r.status_code == 400
    msg = error_of(r)["message"]
    assert "150" in msg and "96" in msg
    r = httpx.post(live.url + "/v1/completions", json={"prompt": list(range(10, 60)), "max_tokens": 80})
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"
    assert "96" in error_of(r)["message"] and "46" in error_of(r)["message"]  # lower max_tokens to 46


def test_out_of_vocabulary_ids_are_400(live):
    r = httpx.post(live.url + "/v1/completions", json={"prompt": [1, 2, 99999]})
    assert r.status_code == 400 and "99999" in error_of(r)["message"]
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "stop_token_ids": [5000]})
    assert r.status_code == 400 and error_of(r)["param"] == "stop_token_ids"


def test_unknown_model_is_404(live):
    for path, body in (
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ):
        r = httpx.post(live.url + path, json={"model": "gpt-9", **body})
        assert r.status_code == 404 and "gpt-9" in error_of(r)["message"]


def test_body_over_limit_is_413(serve):
    s = serve(max_body_bytes=2000)
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "x" * 5000})
    assert r.status_code == 413 and "2000" in error_of(r)["message"]

    def chunked():  # no Content-Length: counted as it streams in
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    r = httpx.post(s.url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.post(s.url + "/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200


def test_api_key(serve):
    s = serve(api_key="sekrit")
    url = s.url + "/v1/completions"
    r = httpx.post(url, json={"prompt": "hi", "max_tokens": 1})
    assert r.status_code == 401 and "missing" in error_of(r)["message"]
    r = httpx.post(url, json={"prompt": "hi", "max_tokens": 1}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and "wrong" in error_of(r)["message"]
    assert (
        httpx.post(url, json={"prompt": "hi", "max_tokens": 1}, headers={"Authorization": "Bearer sekrit"}).status_code
        == 200
    )
    assert httpx.post(s.url + "/tokenize", json={"prompt": "hi"}).status_code == 401
    assert httpx.get(s.url + "/health").status_code == 200  # probes and scrapes need no key
    assert httpx.get(s.url + "/metrics").status_code == 200


def test_queue_full_is_429_and_bad_requests_leave_running_ones_alone(serve):
    s = serve(max_batch_size=1, max_waiting=1)
    s.slow_down(0.02)
    running, events = s.stream_in_background(
        {"prompt": "The quick", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    )
    wait_until(lambda: s.metric("ragtop:num_requests_running") == 1)
    waiting = threading.Thread(
        target=lambda: httpx.post(s.url + "/v1/completions", timeout=60, json={"prompt": "x", "max_tokens": 2})
    )
    waiting.start()
    wait_until(lambda: s.metric("ragtop:num_requests_waiting") == 1)

    r = httpx.post(s.url + "/v1/completions", json={"prompt": "one too many"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "queue is full" in error_of(r)["message"]
    for bad in ({"prompt": "x", "max_tokens": -1}, {"prompt": list(range(200))}, {"prompt": "x", "model": "no"}):
        assert httpx.post(s.url + "/v1/completions", json=bad).status_code in (400, 404, 422)
    running.join(60)
    waiting.join(60)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert s.metric("ragtop:generation_tokens_total") == 42
    assert s.metric("ragtop:http_errors_total", status="429") == 1

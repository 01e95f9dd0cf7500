"""Hostile input and injected faults through a real server: every request body gets a 4xx
naming the problem or a correct answer, every error has OpenAI's shape, and no request
stops or stalls the engine for the others."""

from __future__ import annotations

import json
import threading

import httpx
import numpy as np
import pytest

from .conftest import wait_until
from .test_errors import error_of

SURROGATE = "\ud800"


def still_serves(live) -> None:
    r = httpx.post(
        live.url + "/v1/completions", json={"prompt": "The", "max_tokens": 3, "ignore_eos": True}, timeout=30
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(live.url + "/health").status_code == 200


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 5e-324},
        {"repetition_penalty": 1e-45},
        {"temperature": 1e-300, "repetition_penalty": 1e-300},
        {"repetition_penalty": 1e300},
        {"temperature": 2.0, "top_p": 1e-300},
        {"top_k": 10**12},
        {"min_tokens": 5, "stop_token_ids": list(range(50))},
        {"seed": -(2**63)},
        {"seed": 2**63 - 2, "n": 2},
    ],
)
def test_extreme_sampling_values_get_an_answer_and_the_engine_lives(live, extra):
    """The requests that used to stop the engine for good (temperature 5e-324, ...)."""
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4, **extra}, timeout=30)
    assert r.status_code == 200, r.text
    assert all(c["finish_reason"] in ("stop", "length") for c in r.json()["choices"])
    still_serves(live)


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": SURROGATE}, "prompt"),
        ("/v1/completions", {"prompt": ["ok", "a" + SURROGATE]}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "stop": [SURROGATE]}, "stop"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
            "messages",
        ),
        ("/tokenize", {"prompt": "x" + SURROGATE}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"--5": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"²": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"007": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"1" * 30: 1}}, "logit_bias"),
    ],
)
def test_invalid_text_and_keys_are_4xx_naming_the_field(live, path, body, param):
    # json.dumps escapes a lone surrogate as \\ud800, as a hostile client would send it
    r = httpx.post(live.url + path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    err = error_of(r)
    assert err["param"] and err["param"].startswith(param), err


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "seed": 2**63}, "seed"),
        ({"prompt": "hi", "seed": -(2**63) - 1}, "seed"),
        ({"prompt": "hi", "seed": 2**63 - 1, "n": 2}, "seed"),
        ({"prompt": "hi", "seed": 10**40}, "seed"),
        ({"prompt": "hi", "logit_bias": {"100000": 1}}, "logit_bias"),
        ({"prompt": "hi", "stop_token_ids": [10**30]}, "stop_token_ids"),
        ({"prompt": [10**30]}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
    ],
)
def test_out_of_range_values_are_400_naming_the_field(live, body, param):
    r = httpx.post(live.url + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == param


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "\xff\xfe"}',  # invalid UTF-8
        b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",  # nested 10,000 deep
    ],
)
def test_unparseable_bodies_get_the_openai_error_shape(live, raw):
    r = httpx.post(live.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422)
    assert "body" in error_of(r)["message"] or "JSON" in error_of(r)["message"]
    still_serves(live)


@pytest.mark.parametrize(
    "raw, param",
    [
        (b'{"prompt": "hi", "temperature": NaN}', "temperature"),
        (b'{"prompt": "hi", "repetition_penalty": Infinity}', "repetition_penalty"),
        (b'{"prompt": "hi", "logit_bias": {"1": -Infinity}}', "logit_bias"),
    ],
)
def test_json_nan_and_infinity_are_refused(live, raw, param):
    r = httpx.post(live.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and error_of(r)["param"].startswith(param)


def test_unknown_routes_and_methods_get_the_openai_error_shape(live):
    assert error_of(httpx.get(live.url + "/v1/nowhere"))["type"] == "not_found_error"
    r = httpx.get(live.url + "/v1/completions")
    assert r.status_code == 405 and error_of(r)


def test_openapi_lists_every_status_with_the_error_schema(live):
    spec = httpx.get(live.url + "/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "422", "429", "500", "503"} <= set(responses)
        assert "text/event-stream" in responses["200"]["content"]
        assert responses["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert {"200", "503"} <= set(spec["paths"]["/health"]["get"]["responses"])


# -- injected faults ------------------------------------------------------------------------
MAGIC = 257  # a prompt starting with this token id gets NaN logits from the injected runner


def inject_nan(live) -> None:
    runner = live.state.engine.engine.runner
    forward = runner.forward

    def faulty(chunks):
        out = forward(chunks)
        return [
            np.full(np.asarray(o).shape, np.nan, dtype=np.float32)
            if o is not None and c.start == 0 and c.tokens[0] == MAGIC
            else o
            for c, o in zip(chunks, out, strict=True)
        ]

    runner.forward = faulty


def test_a_request_that_fails_inside_the_engine_gets_500_and_the_others_finish(serve):
    s = serve(max_batch_size=4)
    inject_nan(s)
    s.slow_down(0.01)
    t, events = s.stream_in_background({"prompt": "The", "max_tokens": 30, "ignore_eos": True})
    wait_until(lambda: s.metric("ragtop:num_requests_running") == 1)
    r = httpx.post(s.url + "/v1/completions", json={"prompt": [MAGIC, 5], "max_tokens": 5}, timeout=30)
    assert r.status_code == 500 and error_of(r)["type"] == "server_error"
    assert "non-finite logits" in error_of(r)["message"] and "Traceback" not in r.text
    with httpx.stream(
        "POST", s.url + "/v1/completions", json={"prompt": [MAGIC], "max_tokens": 5, "stream": True}
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == 500
    t.join(60)
    assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    wait_until(lambda: s.metric("ragtop:num_requests_running") == 0)
    assert s.metric("ragtop:request_success_total", finished_reason="error") == 2
    still_serves(s)


def test_a_broken_runner_makes_the_server_unhealthy_and_exit(serve):
    s = serve()
    runner = s.state.engine.engine.runner

    def broken(chunks):
        raise RuntimeError("the device is gone")

    runner.forward = broken
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code in (500, 503) and error_of(r)
    wait_until(lambda: s.state.status == "failed")
    assert s.server.failures and "the device is gone" in s.server.failures[0]
    s.thread.join(30)
    assert not s.thread.is_alive()  # the server shut itself down (`ragtop serve` exits 1)


def test_grace_period_expiry_ends_open_requests_with_errors_not_tracebacks(serve, caplog):
    s = serve(shutdown_grace_s=0.5, max_batch_size=2)
    s.slow_down(0.05)
    plain: list[httpx.Response] = []

    def request() -> None:
        plain.append(
            httpx.post(
                s.url + "/v1/completions", json={"prompt": "A", "max_tokens": 80, "ignore_eos": True}, timeout=60
            )
        )

    streaming, events = s.stream_in_background({"prompt": "The", "max_tokens": 80, "ignore_eos": True})
    threads = [streaming, threading.Thread(target=request)]
    threads[1].start()
    wait_until(lambda: s.metric("ragtop:num_requests_running") == 2)
    s.server.handle_exit(15, None)  # SIGTERM
    for t in threads:
        t.join(60)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == 503
    assert plain[0].status_code == 503 and "shut down" in error_of(plain[0])["message"]
    s.thread.join(30)
    assert not s.thread.is_alive() and not s.server.failures
    assert "Traceback" not in caplog.text and "CancelledError" not in caplog.text


def test_disconnecting_from_a_multi_prompt_stream_frees_every_request(serve, caplog):
    """Found by the fuzzer: closing a stream of several prompts while their outputs were being
    merged raised 'aclose(): asynchronous generator is already running'."""
    s = serve(max_batch_size=4)
    s.slow_down(0.02)
    body = {"prompt": ["The", "A", "State", "Numbers"], "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break  # leave mid-stream: the connection closes
    wait_until(lambda: s.metric("ragtop:num_requests_running") == 0 and s.metric("ragtop:num_requests_waiting") == 0)
    assert s.metric("ragtop:request_success_total", finished_reason="abort") == 4
    assert not s.state.engine._streams
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text
    still_serves(s)

"""ragtop on Ray Serve, for real: a local Ray, 2 replicas, the official openai client through
Ray's HTTP proxy; load sharing, 429 when every replica is full, a killed replica replaced."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ragtop[ray]')")

import openai  # noqa: E402


@pytest.fixture(scope="module")
def client(ray_service) -> openai.OpenAI:
    return openai.OpenAI(base_url=ray_service.url + "/v1", api_key="sekrit", max_retries=0)


def test_openai_client_through_the_proxy(client, ray_service):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.usage.completion_tokens == 5
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 4
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 4


def test_api_key_and_errors_are_ragtop_s(ray_service):
    with ray_service.client() as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = c.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "x", "max_tokens": 500},
            headers={"Authorization": "Bearer sekrit"},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert c.get("/health").json() == {"status": "ready"}


def _stream(url: str, max_tokens: int, results: list, **kw) -> None:
    import httpx

    body = {"model": "tiny", "prompt": "The", "max_tokens": max_tokens, "stream": True, "ignore_eos": True, **kw}
    with (
        httpx.Client(timeout=120) as c,
        c.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": "Bearer sekrit"}) as r,
    ):
        text = r.read().decode()
        results.append((r.status_code, r.headers.get("x-ragtop-replica"), r.headers.get("retry-after"), text))


def _concurrently(n: int, target, *args) -> list:
    import threading

    results: list = []
    threads = [threading.Thread(target=target, args=(*args, results)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_two_replicas_share_load_and_report_metrics(ray_service):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    results = _concurrently(6, _stream, ray_service.url, 12)
    assert [s for s, *_ in results] == [200] * 6
    assert all(text.endswith("data: [DONE]\n\n") for *_, text in results)
    served = {replica for _, replica, *_ in results}
    assert len(served) == 2, served  # power of two choices spread 6 overlapping streams over both
    generated = {}
    for record in ray_service.replicas():
        for family in text_string_to_metric_families(httpx.get(f"http://{record.target}/metrics").text):
            for s in family.samples:
                if s.name == "ragtop:generation_tokens_total":
                    generated[s.labels["replica"]] = s.value
                if s.name == "ragtop:replicas":
                    assert s.value == 2
    assert set(generated) == served and all(v >= 12 for v in generated.values())


def test_429_when_every_replica_is_full(ray_service):
    # 2 replicas x (2 running + 2 waiting) + a router queue of 2 x 4 + 2: 28 streams of 40
    # slowed steps cannot all fit; Ray's proxy refuses the rest, in ragtop's OpenAI shape.
    results = _concurrently(28, _stream, ray_service.url, 40)
    codes = sorted(s for s, *_ in results)
    assert len(codes) == 28 and codes.count(200) >= 8 and 429 in codes, codes
    for status, _, retry_after, text in results:
        if status == 429:
            import json

            error = json.loads(text)["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == 429 and retry_after == "1"
            assert "backpressure" in error["message"]


def _metric_sum(ray_service, name: str, **labels: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for record in ray_service.replicas():
        for family in text_string_to_metric_families(httpx.get(f"http://{record.target}/metrics").text):
            total += sum(
                s.value
                for s in family.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
            )
    return total


def test_client_disconnect_aborts_through_the_proxy(ray_service):
    import time

    import httpx

    from .conftest import wait_until

    aborted = _metric_sum(ray_service, "ragtop:request_success_total", finished_reason="abort")
    body = {"model": "tiny", "prompt": "The", "max_tokens": 90, "ignore_eos": True}
    auth = {"Authorization": "Bearer sekrit"}
    with (
        httpx.Client(timeout=60) as c,
        c.stream("POST", ray_service.url + "/v1/completions", headers=auth, json={**body, "stream": True}) as r,
    ):
        next(r.iter_lines())  # the first chunk: the request runs; now hang up
    start = time.monotonic()
    wait_until(
        lambda: _metric_sum(ray_service, "ragtop:request_success_total", finished_reason="abort") > aborted, timeout=1.5
    )  # long before 90 steps of 20 ms would have finished
    with httpx.Client(timeout=0.3) as c:  # a non-streaming request whose client gives up
        try:
            c.post(ray_service.url + "/v1/completions", headers=auth, json=body)
            raise AssertionError("answered within 0.3 s")
        except httpx.ReadTimeout:
            pass
    wait_until(
        lambda: _metric_sum(ray_service, "ragtop:request_success_total", finished_reason="abort") > aborted + 1,
        timeout=1.5,
    )
    assert time.monotonic() - start < 3.0
    wait_until(lambda: _metric_sum(ray_service, "ragtop:num_requests_running") == 0, timeout=5)


def test_a_killed_replica_is_replaced_and_the_service_keeps_answering(ray_service, client):
    """SIGKILL the replica that serves a stream: the stream ends with an OpenAI error event,
    non-streaming requests that were on it are retried on the live replica, every later
    request is answered, and Ray starts a new replica in its place."""
    import os
    import signal
    import time

    import httpx

    from ragtop.server.ray_proxy import RETRIED_HEADER

    from .conftest import wait_until

    before = {r.replica: r for r in ray_service.replicas()}
    stream = client.completions.create(
        model="tiny", prompt="The", max_tokens=90, stream=True, extra_body={"ignore_eos": True}
    )
    replica = stream.response.headers["x-ragtop-replica"]
    next(iter(stream))
    body = {"model": "tiny", "prompt": "The", "max_tokens": 40, "ignore_eos": True}
    auth = {"Authorization": "Bearer sekrit"}

    def post(results):
        r = httpx.post(ray_service.url + "/v1/completions", headers=auth, json=body, timeout=60)
        results.append((r.status_code, r.headers.get("x-ragtop-replica"), r.headers.get(RETRIED_HEADER)))

    import threading

    results: list = []
    threads = [threading.Thread(target=post, args=(results,)) for _ in range(3)]  # all fit on one replica
    for t in threads:
        t.start()
    time.sleep(0.3)  # every one of them is running on one replica or the other
    os.kill(before[replica].pid, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="the replica serving this request failed"):
        for _ in stream:
            pass
    for t in threads:
        t.join(timeout=60)
    assert [s for s, *_ in results] == [200] * 3, results
    assert any(retried for *_, retried in results), results  # some were on the killed replica
    assert all(served != replica for _, served, retried in results if retried)
    killed_at = time.monotonic()
    while len(after := ray_service.replicas()) < 2 or replica in {r.replica for r in after}:
        r = client.completions.create(model="tiny", prompt="x", max_tokens=2)  # answered meanwhile
        assert r.usage.completion_tokens == 2
        assert time.monotonic() - killed_at < 60, "no replacement replica within 60 s"
        time.sleep(0.2)
    assert len({r.pid for r in after} - {r.pid for r in before.values()}) == 1
    served = wait_until(
        lambda: (
            {
                client.completions.with_raw_response.create(model="tiny", prompt="x", max_tokens=2).headers[
                    "x-ragtop-replica"
                ]
                for _ in range(6)
            }
            - {replica}
        ),
        timeout=30,
    )
    assert served and replica not in served

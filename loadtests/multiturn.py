"""`python -m loadtests multiturn`: chat with a long document, with and without prefix caching.

Each user sends a long document as the system message and asks a question, then asks
follow-up questions in the same conversation (the earlier answers included, as chat clients
do). The time to first token of the first turn pays for the whole document; a follow-up's
should pay only for what is new when the server reuses the cached prefix. The command runs
the same conversations against `ragtop serve MODEL` twice — prefix caching on (the default)
and `--no-prefix-caching` — and reports TTFT per turn, the cached tokens the server reported
(`usage.prompt_tokens_details.cached_tokens`), and the ratio.

    python -m loadtests multiturn --model MODEL_DIR --doc-tokens 2048 --questions 3 --users 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from .server import ServerProcess

SENTENCES = [
    "The committee reviewed the budget for the coming year and found the costs of the program higher than planned.",
    "Farmers in the western states reported a good harvest, while the eastern ports handled more trade than ever.",
    "The secretary explained how the new rules would protect workers and what the courts had said about them.",
    "In {year} the nation counted {n} new schools, {m} miles of railroad and a growing number of public libraries.",
    "Congress debated the treaty for many weeks before the vote, and the final text added three articles on fisheries.",
]
QUESTIONS = [
    "What did the committee find about the costs?",
    "How many new schools were counted?",
    "What did the farmers report?",
    "What did the treaty add?",
    "Summarize the document in one sentence.",
]


def document(tokenize, n_tokens: int) -> str:
    """Deterministic report-like text of about n_tokens tokens (by the server's tokenizer)."""
    parts, i = [], 0
    while True:
        s = SENTENCES[i % len(SENTENCES)].format(year=1800 + i, n=i * 7 % 900, m=i * 13 % 5000)
        parts.append(s)
        i += 1
        if i % 20 == 0 and tokenize(" ".join(parts)) >= n_tokens:
            return " ".join(parts)


def ask(client: httpx.Client, model: str, messages: list[dict], max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, text, usage = None, [], None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                if c["delta"].get("content"):
                    ttft = ttft or time.perf_counter() - t0
                    text.append(c["delta"]["content"])
    return {"ttft_s": ttft, "e2e_s": time.perf_counter() - t0, "text": "".join(text), "usage": usage}


def conversation(url: str, doc: str, questions: list[str], max_tokens: int) -> list[dict]:
    with httpx.Client(base_url=url, timeout=3600) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        messages = [{"role": "system", "content": doc}]
        turns = []
        for q in questions:
            messages.append({"role": "user", "content": q})
            turn = ask(client, model, messages, max_tokens)
            messages.append({"role": "assistant", "content": turn["text"]})
            turns.append(
                {
                    "question": q,
                    "ttft_s": turn["ttft_s"],
                    "e2e_s": turn["e2e_s"],
                    "prompt_tokens": turn["usage"]["prompt_tokens"],
                    "cached_tokens": turn["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0),
                    "answer": turn["text"],
                }
            )
        return turns


def run(model: Path, doc_tokens: int, questions: int, max_tokens: int, threads: int, log_dir: Path) -> dict:
    results = {}
    for label, extra in (("prefix caching", []), ("no prefix caching", ["--no-prefix-caching"])):
        with ServerProcess(
            model, ["--threads", str(threads), *extra], log_path=log_dir / f"server-{len(results)}.log"
        ) as srv:

            def tokenize(text: str) -> int:
                return httpx.post(srv.url + "/tokenize", json={"prompt": text}, timeout=600).json()["count"]

            doc = document(tokenize, doc_tokens)
            results[label] = conversation(srv.url, doc, QUESTIONS[:questions], max_tokens)
    return results


def summarize(results: dict) -> dict:
    out = {}
    for label, turns in results.items():
        follow = [t["ttft_s"] for t in turns[1:]]
        out[label] = {
            "first_ttft_s": turns[0]["ttft_s"],
            "follow_up_ttft_s_median": statistics.median(follow) if follow else None,
            "follow_up_cached_tokens": [t["cached_tokens"] for t in turns[1:]],
            "prompt_tokens": [t["prompt_tokens"] for t in turns],
        }
    on, off = out.get("prefix caching"), out.get("no prefix caching")
    if on and off and on["follow_up_ttft_s_median"]:
        out["follow_up_ttft_ratio"] = off["follow_up_ttft_s_median"] / on["follow_up_ttft_s_median"]
        out["same_answers"] = [a["answer"] for a in results["prefix caching"]] == [
            b["answer"] for b in results["no prefix caching"]
        ]
    return out


def add_arguments(sub) -> None:
    p = sub.add_parser("multiturn", help="chat with a long document: follow-up TTFT with and without prefix caching")
    p.add_argument("--model", type=Path, required=True, help="exported model folder to serve")
    p.add_argument("--doc-tokens", type=int, default=2048)
    p.add_argument("--questions", type=int, default=3, help="turns per conversation (the first pays for the document)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("build/multiturn"))
    p.set_defaults(func=cmd_multiturn)


def cmd_multiturn(a: argparse.Namespace) -> int:
    a.out.mkdir(parents=True, exist_ok=True)
    results = run(a.model, a.doc_tokens, a.questions, a.max_tokens, a.threads, a.out)
    summary = summarize(results)
    (a.out / "multiturn.json").write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(a).items() if k != "func"}, "summary": summary, "turns": results},
            indent=1,
        )
    )
    for label in ("prefix caching", "no prefix caching"):
        s = summary[label]
        print(
            f"{label:>18}: first turn TTFT {s['first_ttft_s']:.2f} s; follow-ups median TTFT "
            f"{s['follow_up_ttft_s_median']:.2f} s, cached tokens {s['follow_up_cached_tokens']}, prompts "
            f"{s['prompt_tokens']}"
        )
    if "follow_up_ttft_ratio" in summary:
        print(
            f"follow-up TTFT without / with prefix caching: {summary['follow_up_ttft_ratio']:.1f}x; "
            f"same answers: {summary['same_answers']}"
        )
    return 0

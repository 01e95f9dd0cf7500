"""ragtop's load tests: an async HTTP load generator against the OpenAI endpoints, the
long-context and concurrency sweeps, a memory-bandwidth probe, and the benchmark report.

    python -m loadtests run --url http://127.0.0.1:8000 --concurrency 4 --num-requests 32
    python -m loadtests context-sweep --quick
    python -m loadtests concurrency-sweep --quick
    python -m loadtests report

It talks to the server over HTTP only (it never imports `ragtop.server`); nothing in ragtop
imports it (tests/test_import_rules.py). docs/benchmarks.md describes the figures.
"""

SCHEMA = "ragtop-loadtest/1"

"""The paged KV cache through the server: a folder exported with a paged graph is served paged
by default (--kv-cache auto), answers as the contiguous cache does, prefix hits still count,
and the metrics report pages used and free."""

from __future__ import annotations

import shutil

from ragtop.export.onnx import write_paged_graph
from ragtop.server.settings import ServerSettings

from .conftest import start_server
from .test_prefix_cache import ask


def test_a_paged_export_is_served_paged_and_answers_the_same(exported, serve, tmp_path):
    folder = tmp_path / "paged"
    shutil.copytree(exported["topk"], folder)
    write_paged_graph(folder)
    paged = start_server(ServerSettings(model=folder, served_model_name="tiny", threads=1, max_batch_size=4))
    try:
        first, second = ask(paged.url, "The economy?"), ask(paged.url, "The budget?")
        assert second.usage.prompt_tokens_details.cached_tokens > 0  # pages shared with the first request
        used, free = paged.metric("ragtop:kv_cache_blocks_used"), paged.metric("ragtop:kv_cache_blocks_free")
        assert used > 0 and free > 0
        assert paged.metric("ragtop:num_preemptions_total") == 0
        contiguous = serve(served_model_name="tiny")
        for q, got in (("The economy?", first), ("The budget?", second)):
            assert ask(contiguous.url, q).choices[0].message.content == got.choices[0].message.content
        assert contiguous.metric("ragtop:kv_cache_blocks_used") == 0
    finally:
        paged.stop()
    settings = ServerSettings(model=exported["topk"], served_model_name="tiny", threads=1, kv_cache="paged")
    forced = start_server(settings, exit_on_failure=False)  # a folder without a paged graph
    try:
        assert forced.state.status == "failed" and "--paged-kv" in (forced.state.error or "")
    finally:
        forced.stop()

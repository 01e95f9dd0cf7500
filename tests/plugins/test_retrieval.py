"""`ragtop bench retrieval`: prompt construction and the harness on a tiny model."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, models, pre_tokenizers

from ragtop.bench.retrieval import (
    FILLER,
    greedy,
    make_prompt,
    make_prompts,
    retrieval_table,
    run_retrieval,
)
from ragtop.model import AttentionConfig, KVCache, ModelConfig, Transformer


def char_tokenizer() -> Tokenizer:
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .?"))
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return tok


def test_prompt_hides_the_key_at_the_depth():
    tok = char_tokenizer()
    unit = len(tok.encode(" " + FILLER).ids)
    for depth in (0.0, 0.5, 1.0):
        p = make_prompt(tok, 2000, depth, "12345", prefix=[0])
        assert abs(len(p.ids) - 2000) <= unit and p.ids[0] == 0
        text = "".join(tok.id_to_token(i) for i in p.ids[1:])
        assert text.count("12345") == 2 and text.endswith("What is the pass key? The pass key is")
        before = text[: text.index("The pass key is 12345")].count("The grass is green")
        total = text.count("The grass is green")
        assert before == round(depth * total)
        assert "".join(tok.id_to_token(i) for i in p.ids[p.needle_at : p.needle_at + 16]) == " The pass key is"
    keys = [p.key for p in make_prompts(tok, [500, 800], [0.1, 0.9], 2, seed=3)]
    assert len(keys) == 8 and all(len(k) == 5 and k.isdigit() for k in keys)
    assert keys == [p.key for p in make_prompts(tok, [500, 800], [0.1, 0.9], 2, seed=3)]  # reproducible


def test_greedy_matches_full_recompute():
    torch = __import__("torch")
    torch.manual_seed(0)
    m = Transformer(
        ModelConfig(vocab_size=20, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24, max_seq_len=64)
    ).eval()
    ids = [1, 5, 7, 2, 9]
    out = greedy(m, ids, 6)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(ids) :]
    assert KVCache.allocate(m.config, 1, 11).capacity == 11


def test_retrieval_rows_and_table(tmp_path):
    tok = char_tokenizer()
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(), d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24, max_seq_len=512
    )
    model = Transformer(cfg).eval()
    prompts = make_prompts(tok, [200, 300], [0.2, 0.8], 1)
    settings = [
        ("dense", AttentionConfig()),
        ("window", AttentionConfig("topk", topk=1, block_size=16, block_budget=1, sink_tokens=4, local_window=512)),
    ]
    out = tmp_path / "r.jsonl"
    rows = run_retrieval(model, tok, settings, prompts, answer_tokens=3, out=out, log=lambda s: None)
    assert len(rows) == 8 and len(out.read_text().splitlines()) == 8
    dense = [r["answer"] for r in rows if r["setting"] == "dense"]
    window = [r["answer"] for r in rows if r["setting"] == "window"]
    assert dense == window  # a window covering every key is dense
    assert all(r["correct"] == (r["key"] in r["answer"]) for r in rows)
    assert json.loads(out.read_text().splitlines()[0])["length"] == 200
    # resuming: trials already written are not run again
    again = run_retrieval(
        model,
        tok,
        settings,
        prompts,
        answer_tokens=3,
        out=out,
        log=lambda s: None,
        done=[json.loads(line) for line in out.read_text().splitlines()],
    )
    assert again == rows and len(out.read_text().splitlines()) == 8
    # the table: one row per setting, one column per length, misses named by depth
    rows[0]["correct"], rows[1]["correct"] = True, False
    table = retrieval_table(rows).splitlines()
    assert table[0] == "| setting | 200 tokens | 300 tokens | all |"
    assert table[2].startswith("| dense | 1/2 (missed at depth 0.8) | ")
    partial = retrieval_table([r for r in rows if not (r["setting"] == "window" and r["length"] == 300)]).splitlines()
    assert partial[3].startswith("| window | ") and partial[3].split(" | ")[2] == "–"

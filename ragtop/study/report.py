"""Tables and plots of the study reports, written into marked sections of a markdown file.

`render(results_dir, doc)` reads embeddings.json, attention.json and analyze.json (those
present), writes PNG plots next to them, and replaces the text between
`<!-- BEGIN name -->` and `<!-- END name -->` in `doc` with freshly generated tables.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import RagtopError

ARM_LABEL = {"standard": "standard", "tiered_same_body": "tiered, same body", "tiered_same_total": "tiered, same total"}


def _ms(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _size(row: dict) -> str:
    n = row["corpus_tokens"]
    return f"full ({n / 1e6:.1f}M)" if row["full_corpus"] else (f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}K")


def merge_embedding_reports(reports: list[dict]) -> dict:
    """One report per setup (run as separate processes) -> one report; each setup keeps its run's budget."""
    merged = {"study": "embeddings", "setups": {}}
    for r in reports:
        for name, s in r["setups"].items():
            merged["setups"][name] = {
                **s,
                "run": {k: r[k] for k in ("budget", "seeds", "score_tokens", "seconds")},
                "complete": r.get("complete", True),
            }
    return merged


def embeddings_table(merged: dict) -> str:
    out = []
    for name, s in merged["setups"].items():
        out.extend(_setup_table(name, s))
    return "\n".join(out)


def _setup_table(name: str, s: dict) -> list[str]:
    rep = s["run"]
    b = rep["budget"]
    out = [
        f"Budget per run: {b['steps']} steps × {b['batch_size']} × {b['context']} = {b['tokens']:,} training tokens "
        f"(all arms); seeds {rep['seeds']}; losses in nats/token, mean ± std; held-out = first "
        f"{rep['score_tokens']:,} tokens of the 2010–2021 speeches; train = first ≤{rep['score_tokens']:,} tokens of "
        "the "
        f"training corpus. Wall time {rep['seconds'] / 60:.1f} min"
        f"{'' if s['complete'] else ' (INCOMPLETE: still running or stopped)'}.\n"
    ]
    st = s["setup"]
    out.append(
        f"\n**{name}** (vocab {st['vocab_size']}, width {st['d_model']}, {st['n_layers']} layer(s), d_ff "
        f"{st['d_ff']})\n"
    )
    out.append("| corpus | epochs | arm | params total / non-emb / emb | held-out loss | train loss | gap |")
    out.append("|---|---:|---|---:|---:|---:|---:|")
    for row in s["rows"]:
        for arm, a in row["arms"].items():
            gap = a["heldout_loss"]["mean"] - a["train_loss"]["mean"]
            p = a["params"]
            out.append(
                f"| {_size(row)} | {a['epochs']:.3g} | {ARM_LABEL[arm]} | {p['total']:,} / "
                f"{p['non_embedding']:,} / {p['embedding'] + p['head']:,} | {_ms(a['heldout_loss'])} | "
                f"{_ms(a['train_loss'])} | {gap:+.2f} |"
            )
    out.append("")
    out.append(
        "| corpus | tiers (sizes × widths) | emb params tiered / standard | held-out: tiered same body − standard "
        "| tiered same total − standard | train: tiered same body − standard |"
    )
    out.append("|---|---|---:|---:|---:|---:|")
    for row in s["rows"]:
        a = row["arms"]
        std = a["standard"]["heldout_loss"]["mean"]
        t = row["tiers"]
        emb = [a[x]["params"]["embedding"] + a[x]["params"]["head"] for x in ("tiered_same_body", "standard")]
        out.append(
            f"| {_size(row)} | {'+'.join(map(str, t['sizes']))} × {'/'.join(map(str, t['widths']))} | "
            f"{emb[0]:,} / {emb[1]:,} = {emb[0] / emb[1]:.3f}× | "
            f"{a['tiered_same_body']['heldout_loss']['mean'] - std:+.3f} | "
            f"{a['tiered_same_total']['heldout_loss']['mean'] - std:+.3f} | "
            f"{a['tiered_same_body']['train_loss']['mean'] - a['standard']['train_loss']['mean']:+.3f} |"
        )
    out.append("")
    return out


def attention_table(rep: dict) -> str:
    b, s = rep["budget"], rep["setup"]
    out = [
        f"Setup {s['name']}: vocab {s['vocab_size']}, width {s['d_model']}, {s['n_layers']} layers, context "
        f"{b['context']}; {b['tokens']:,} training tokens per run on the full training split "
        f"({rep['corpus_tokens']:,} tokens); seeds {rep['seeds']}; parameters identical across arms: "
        f"{rep['params_match']}. Wall time {rep['seconds'] / 60:.1f} min.\n",
        "| arm | params | held-out loss | held-out perplexity | Δ loss vs dense |",
        "|---|---:|---:|---:|---:|",
    ]
    dense = rep["arms"]["dense"]["heldout_loss"]["mean"]
    for name, a in rep["arms"].items():
        out.append(
            f"| {name} | {a['params']['total']:,} | {_ms(a['heldout_loss'])} | {_ms(a['heldout_ppl'], 2)} | "
            f"{a['heldout_loss']['mean'] - dense:+.3f} |"
        )
    return "\n".join(out)


def analyze_tables(rep: dict) -> str:
    from .analyze import format_tables

    return "```\n" + format_tables(rep) + "\n```"


def plot_embeddings(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = rep["setups"]
    fig, axes = plt.subplots(1, len(setups), figsize=(5.5 * len(setups), 4), squeeze=False)
    colors = {"standard": "C0", "tiered_same_body": "C1", "tiered_same_total": "C2"}
    for ax, (name, s) in zip(axes[0], setups.items(), strict=True):
        xs = [r["corpus_tokens"] for r in s["rows"]]
        for arm, c in colors.items():
            for key, style in (("heldout_loss", "-o"), ("train_loss", "--x")):
                m = [r["arms"][arm][key]["mean"] for r in s["rows"]]
                e = [r["arms"][arm][key]["std"] for r in s["rows"]]
                ax.errorbar(
                    xs,
                    m,
                    yerr=e,
                    fmt=style,
                    color=c,
                    ms=4,
                    capsize=2,
                    label=f"{ARM_LABEL[arm]} ({'held-out' if key == 'heldout_loss' else 'train'})",
                )
        ax.set_xscale("log")
        ax.set_xlabel("training corpus (tokens)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_speedup(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = rep["decode"]
    L = [x["L"] for x in d]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(L, [x["speedup_exact"] for x in d], "-o", color="C0", label="exact top-k, measured")
    ax.plot(L, [x["theory_speedup_exact"] for x in d], ":", color="C0", label="exact top-k, bytes ratio")
    ax.plot(L, [x["speedup_block"] for x in d], "-o", color="C1", label="block top-k, measured")
    ax.plot(L, [x["theory_speedup_block"] for x in d], ":", color="C1", label="block top-k, bytes ratio")
    ax.axhline(1, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode attention speedup vs dense")
    ax.set_title("one layer, d=512, CPU, 1 thread")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def replace_section(text: str, name: str, body: str) -> str:
    pat = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n).*?(<!-- END {re.escape(name)} -->)", re.S)
    if not pat.search(text):
        raise RagtopError(f"section markers for {name!r} not found")
    return pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def render(results: Path, doc: Path) -> list[str]:
    results, doc = Path(results), Path(doc)
    if not doc.is_file():
        raise RagtopError(f"markdown file not found: {doc}")
    text, done = doc.read_text(), []
    for name, table, plot in (
        ("embeddings", embeddings_table, plot_embeddings),
        ("attention", attention_table, None),
        ("analyze", analyze_tables, plot_speedup),
    ):
        if name == "embeddings":
            files = sorted(results.glob("embeddings*.json"))
            if not files:
                continue
            rep, f = merge_embedding_reports([json.loads(x.read_text()) for x in files]), ", ".join(map(str, files))
        else:
            f = results / f"{name}.json"
            if not f.is_file():
                continue
            rep = json.loads(f.read_text())
        text = replace_section(text, name, table(rep))
        done.append(f"{name}: tables from {f}")
        if plot is not None and (name != "analyze" or "decode" in rep):
            png = results / f"{name}.png"
            plot(rep, png)
            done.append(f"{name}: plot {png}")
    doc.write_text(text)
    return done

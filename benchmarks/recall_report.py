"""Markdown tables of the recall study from its result files (docs/recall/<sweep>/*.json).

    python benchmarks/recall_report.py [docs/recall]      # prints the tables docs/recall.md holds
"""
import json
import sys
from pathlib import Path


def rows(folder: Path):
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        c = r["config"]
        model = f"rrwkv s={c['interval']}" if c["model"] == "rrwkv" else c["model"]
        yield c, model, r


def first_step(r: dict, level: float):
    """The first evaluated step whose held-out accuracy reached `level` ('-' if none did)."""
    return next((p["step"] for p in r["curve"] if p["accuracy"] >= level), "-")


def setting(c: dict) -> str:
    """What the run's data and model were beyond the table's columns. Runs from before these settings
    existed (2026-12-05) had an untied head and random tokens between the queries."""
    tied = "tied" if c.get("tie_embeddings", False) else "untied"
    filler = "noise" if c.get("random_non_queries", True) else "0"
    heads = f", {c['heads']} heads" if c.get("heads") else ""
    vocab = f", V {c['vocab_size']}" if c.get("vocab_size", 8192) != 8192 else ""
    return f"{tied}, filler {filler}{heads}{vocab}"


def mqar_table(folder: Path) -> str:
    out = ["| cell (T, K) | model | d | setting | batch | lr | accuracy | steps | step at 0.9 | state floats/layer | "
           "tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, model, r in sorted(rows(folder), key=lambda x: (x[0]["seq_len"], x[1], x[0]["d_model"], setting(x[0]),
                                                           x[0]["lr"])):
        out.append(f"| ({c['seq_len']}, {c['kv_pairs']}) | {model} | {c['d_model']} | {setting(c)} | "
                   f"{c['batch_size']} | {c['lr']:g} | {r['accuracy']:.3f} | {r['steps']} | {first_step(r, 0.9)} | "
                   f"{r['state_size']} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(out)


def gap_table(folder: Path) -> str:
    items = list(rows(folder))
    gaps = list(items[0][2]["accuracy_by_gap"]) if items else []
    out = ["| model | seed | train acc. | " + " | ".join(f"G={g}" for g in gaps) + " |",
           "|---|---|---|" + "---|" * len(gaps)]
    for c, model, r in sorted(items, key=lambda x: (x[1], x[0]["seed"])):
        cells = ["-" if v is None else f"{v:.3f}" for v in r["accuracy_by_gap"].values()]
        out.append(f"| {model} | {c['seed']} | {r['accuracy']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(root: str = "docs/recall") -> None:
    root = Path(root)
    for sweep in sorted(p for p in root.iterdir() if p.is_dir()):
        print(f"### {sweep.name}\n")
        print(gap_table(sweep) if sweep.name.startswith("gap") else mqar_table(sweep))
        print()


if __name__ == "__main__":
    main(*sys.argv[1:])

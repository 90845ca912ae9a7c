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


def mqar_table(folder: Path) -> str:
    out = ["| cell (T, K) | model | d | lr | accuracy | steps | state floats/layer | tokens/s |",
           "|---|---|---|---|---|---|---|---|"]
    for c, model, r in sorted(rows(folder), key=lambda x: (x[0]["seq_len"], x[1], x[0]["d_model"], x[0]["lr"])):
        out.append(f"| ({c['seq_len']}, {c['kv_pairs']}) | {model} | {c['d_model']} | {c['lr']:g} | "
                   f"{r['accuracy']:.3f} | {r['steps']} | {r['state_size']} | {r['tokens_per_s']:,.0f} |")
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

#!/usr/bin/env python
"""Tables and plots of the long-range study from its result files (benchmarks/long_range/run.sh).

    python benchmarks/long_range/report.py [--results docs/long_range] [--doc docs/long_range.md] [--plots DIR]

Reads every RESULTS/*.json that run.sh wrote, groups them by run name (one or more seeds), and
replaces what lies between the markers `<!-- long_range:results:begin -->` and
`<!-- long_range:results:end -->` in --doc with the tables; writes loss_by_position.png and
accuracy_by_distance.png into --plots (default: --results). With several seeds a cell shows the mean
and, in brackets, each seed's value. Result files of pilots (CPU, changed model) are reported under
a banner that says so, and are never mixed with study runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- long_range:results:begin -->", "<!-- long_range:results:end -->"
LABELS = {"rwkv4": "RWKV-4", "rrwkv-s32": "RRWKV s=32", "rrwkv-s128": "RRWKV s=128"}
BASELINE = "rwkv4"
TASKS = (("passkey", "Passkey retrieval"), ("associative_recall", "Associative recall"))


class ReportError(ValueError):
    pass


def load_results(folder: Path) -> Dict[str, List[dict]]:
    """{name: [result, ...] ordered by seed}, names ordered by medium interval."""
    files = sorted(folder.glob("*.json"))
    if not files:
        raise ReportError(f"no result files (*.json) in {folder}: run benchmarks/long_range/run.sh first")
    runs: Dict[str, List[dict]] = {}
    for f in files:
        try:
            r = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReportError(f"{f} is not JSON ({e})") from None
        if not isinstance(r, dict) or r.get("study") != "long_range" or r.get("format") != 1:
            raise ReportError(f"{f} is not a result file of benchmarks/long_range/run.sh (study/format fields)")
        for key in ("name", "seed", "train", "model_config", "params", "pilot"):
            if key not in r:
                raise ReportError(f"{f} lacks the field {key!r}; write it again with run.sh")
        r["_file"] = f.name
        runs.setdefault(r["name"], []).append(r)
    for name, rs in runs.items():
        seeds = [r["seed"] for r in rs]
        if len(set(seeds)) != len(seeds):
            raise ReportError(f"{folder} holds two result files of {name} with the same seed {seeds}")
        rs.sort(key=lambda r: r["seed"])
    pilots = {r["pilot"] for rs in runs.values() for r in rs}
    if len(pilots) > 1:
        raise ReportError(f"{folder} mixes pilot results with study results; keep them in separate folders")
    return dict(sorted(runs.items(), key=lambda kv: (kv[1][0]["model_config"]["medium_interval"], kv[0])))


def label(name: str) -> str:
    return LABELS.get(name, name)


def cell(values: Sequence[Optional[float]], fmt: str = "{:.3f}") -> str:
    """Mean, and each value in brackets when there are several; '–' when none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    text = fmt.format(statistics.fmean(vals))
    if len(values) > 1:
        text += " (" + " / ".join("–" if v is None else fmt.format(v) for v in values) + ")"
    return text


def bucket_rows(r: dict) -> Dict[str, dict]:
    return {b["bucket"]: b for b in (r.get("eval") or {}).get("loss_by_position", [])}


def all_buckets(runs: Dict[str, List[dict]]) -> List[tuple]:
    seen = {}
    for rs in runs.values():
        for r in rs:
            for b in bucket_rows(r).values():
                seen[b["bucket"]] = (b["start"], b["end"], b["documents"])
    return sorted(((k, *v) for k, v in seen.items()), key=lambda t: t[1])


def task_rows(r: dict, task: str) -> Dict[int, dict]:
    return {t["distance"]: t for t in ((r.get("eval") or {}).get("tasks") or {}).get(task, [])}


def all_distances(runs, task) -> List[int]:
    return sorted({d for rs in runs.values() for r in rs for d in task_rows(r, task)})


def count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def docs(n: int) -> str:
    return f"{n} doc" if n == 1 else f"{n} docs"


def dist_label(d: int) -> str:
    return f"{d // 1024}k" if d >= 1024 and d % 1024 == 0 else str(d)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def notes(runs: Dict[str, List[dict]]) -> List[str]:
    out = []
    every = [r for rs in runs.values() for r in rs]
    for key, what in ((lambda r: r["train"].get("steps_planned"), "train.max_steps"),
                      (lambda r: (r["global_batch_size"], r["seq_len"]), "batch x sequence length"),
                      (lambda r: json.dumps((r.get("corpus") or {}).get("files"), sort_keys=True), "corpus files"),
                      (lambda r: (r.get("device") or {}).get("name"), "GPU")):
        if len({json.dumps(key(r), sort_keys=True, default=str) for r in every}) > 1:
            out.append(f"- **The runs differ in {what}**: compare them with care.")
    for r in every:
        t = r["train"]
        if not t.get("complete", True):
            out.append(f"- {label(r['name'])} seed {r['seed']} stopped at step {t['steps_done']} of "
                       f"{t['steps_planned']} (training exit status {t.get('exit_status')}; 75: the time guard): "
                       "run its command again to finish it.")
        if t.get("starts", 1) > 1 and t.get("complete", True):
            out.append(f"- {label(r['name'])} seed {r['seed']} trained in {t['starts']} starts (the time guard stopped "
                       "it and the same command continued it from its checkpoint): its train seconds are left out.")
        if r.get("shared_gpu", 1) > 1:
            out.append(f"- {label(r['name'])} seed {r['seed']} ran on a GPU shared by {r['shared_gpu']} runs: its "
                       "tokens/s and wall times are left out (shown as –); its losses and accuracies stand.")
        if r.get("eval") is None:
            code = r.get("eval_exit_status")
            out.append(f"- {label(r['name'])} seed {r['seed']} has no evaluation report"
                       + (f" (evaluation exit status {code}; 124: its time limit)." if code else "."))
    return out


def markdown(runs: Dict[str, List[dict]], plots: Dict[str, Path], doc_dir: Path, results: Path) -> str:
    every = [r for rs in runs.values() for r in rs]
    lines = []
    if every[0]["pilot"]:
        lines += ["**PILOT of the scripts, not the study**: these figures come from tiny runs "
                  f"({', '.join(sorted({' '.join(r['overrides']) or 'no overrides' for r in every}))}; "
                  f"device {', '.join(sorted({r['device']['type'] for r in every}))}); they say nothing about "
                  "RRWKV against RWKV-4.", ""]
    cards = sorted({(r.get("device") or {}).get("name") or (r.get("device") or {}).get("type", "?") for r in every})
    shown = results.relative_to(ROOT) if results.is_relative_to(ROOT) else results
    lines += [f"Generated by `benchmarks/long_range/report.py` from `{shown}/*.json` "
              f"({len(every)} result files; dates {min(r['date'] for r in every)[:10]} to "
              f"{max(r['date'] for r in every)[:10]}; {', '.join(cards)}). With two seeds a cell reads "
              "`mean (seed 1 / seed 2)`, seeds in ascending order.", ""]
    lines += ["### Runs", ""]
    rows = []
    for name, rs in runs.items():
        r0 = rs[0]
        alone = [r.get("shared_gpu", 1) == 1 for r in rs]    # runs that shared the GPU are not timed
        # the wall time of training only when it ran in one start (a resumed run's covers the last start)
        wall = [{**r.get("wall_s", {}), **({} if r["train"].get("starts", 1) == 1 else {"train": None})}
                if a else {} for r, a in zip(rs, alone)]
        rows.append([label(name), str(r0["model_config"]["medium_interval"]), f"{r0['params'] / 1e6:.2f}M",
                     ", ".join(str(r["seed"]) for r in rs),
                     f"{r0['train']['steps_done']} ({count(r0['train']['tokens'])})",
                     cell([r["train"].get("tokens_per_s_median") if a else None for r, a in zip(rs, alone)],
                          "{:,.0f}"),
                     cell([r["train"]["final_train_loss"] for r in rs]),
                     cell([w.get("train") for w in wall], "{:.0f}"), cell([w.get("eval") for w in wall], "{:.0f}")])
    lines += table(["run", "s", "parameters", "seeds", "steps (tokens)", "train tokens/s (median)",
                    "final train loss", "train s", "eval s"], rows) + [""]

    buckets = all_buckets(runs)
    lines += ["### Validation loss, overall and by position in the document", "",
              "Each bucket averages the targets at those positions over the validation documents that reach "
              "the bucket's end (document counts in the header).", ""]
    rows = []
    for name, rs in runs.items():
        rows.append([label(name), cell([(r.get("eval") or {}).get("loss") for r in rs]),
                     cell([(r.get("eval") or {}).get("perplexity") for r in rs], "{:.2f}")]
                    + [cell([bucket_rows(r).get(b[0], {}).get("loss") for r in rs]) for b in buckets])
    lines += table(["run", "loss", "perplexity"] + [f"{b[0]} ({docs(b[3])})" for b in buckets], rows) + [""]
    if BASELINE in runs and len(runs) > 1:
        base = {r["seed"]: r for r in runs[BASELINE]}
        getters = [lambda r: (r.get("eval") or {}).get("loss")] + \
                  [lambda r, b=b: bucket_rows(r).get(b[0], {}).get("loss") for b in buckets]
        rows = []
        for name, rs in runs.items():
            pairs = [(r, base[r["seed"]]) for r in rs if r["seed"] in base]
            if name == BASELINE or not pairs:
                continue
            diffs = [[None if g(r) is None or g(z) is None else g(r) - g(z) for r, z in pairs] for g in getters]
            rows.append([f"{label(name)} (seeds {', '.join(str(r['seed']) for r, _ in pairs)})"]
                        + [cell(d, "{:+.3f}") for d in diffs])
        lines += [f"Difference from {label(BASELINE)}, seed by seed (the same seed: the same data order; "
                  f"negative = lower loss than {label(BASELINE)}):", ""]
        lines += table(["run", "loss"] + [b[0] for b in buckets], rows) + [""]

    for task, title in TASKS:
        dists = all_distances(runs, task)
        if not dists:
            continue
        samples = sorted({(r.get("eval") or {}).get("tasks", {}).get("samples_per_distance") for r in every} - {None})
        lines += [f"### {title}: accuracy by distance (answer NLL in the second table)", "",
                  f"{', '.join(map(str, samples))} sequences per distance; an answer counts when all of its tokens "
                  "are the model's argmax.", ""]
        acc = [[label(n)] + [cell([task_rows(r, task).get(d, {}).get("accuracy") for r in rs], "{:.2f}")
                             for d in dists] for n, rs in runs.items()]
        nll = [[label(n)] + [cell([task_rows(r, task).get(d, {}).get("answer_nll") for r in rs], "{:.2f}")
                             for d in dists] for n, rs in runs.items()]
        head = ["run"] + [f"d={dist_label(d)}" for d in dists]
        lines += table(head, acc) + [""] + table(head, nll) + [""]
    for key, title in (("loss", "Loss by position"), ("accuracy", "Accuracy by distance")):
        if key in plots:
            lines.append(f"![{title}]({os.path.relpath(plots[key], doc_dir)})")
    lines.append("")
    extra = notes(runs)
    if extra:
        lines += ["Notes:", ""] + extra + [""]
    return "\n".join(lines)


def draw(ax, xs, per_seed: List[List[Optional[float]]], color, name: str) -> None:
    """The mean over seeds as a line; with several seeds each seed's values as faint dots."""
    mean = [statistics.fmean(v) if None not in v else None for v in zip(*per_seed)]
    ax.plot([x for x, m in zip(xs, mean) if m is not None], [m for m in mean if m is not None],
            marker="o", color=color, label=name)
    if len(per_seed) > 1:
        for vals in per_seed:
            ax.plot([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None],
                    linestyle="none", marker=".", color=color, alpha=0.5)


def plot(runs: Dict[str, List[dict]], out: Path) -> Dict[str, Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pilot = next(iter(runs.values()))[0]["pilot"]
    suffix = " (PILOT, not the study)" if pilot else ""
    out.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    made = {}

    buckets = all_buckets(runs)
    if buckets:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        xs = list(range(len(buckets)))
        for i, (name, rs) in enumerate(runs.items()):
            draw(ax, xs, [[bucket_rows(r).get(b[0], {}).get("loss") for b in buckets] for r in rs],
                 colors[i % len(colors)], label(name) + (f" ({len(rs)} seeds)" if len(rs) > 1 else ""))
        ax.set_xticks(xs, [f"{b[0]}\n({docs(b[3])})" for b in buckets])
        ax.set_xlabel("position in the document (tokens)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("Loss by position" + suffix)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        made["loss"] = out / "loss_by_position.png"
        fig.savefig(made["loss"], dpi=120)
        plt.close(fig)

    present = [(t, title) for t, title in TASKS if all_distances(runs, t)]
    if present:
        fig, axes = plt.subplots(2, len(present), figsize=(5.5 * len(present), 6.5), squeeze=False)
        for j, (task, title) in enumerate(present):
            dists = all_distances(runs, task)
            for row, (key, ylabel) in enumerate((("accuracy", "accuracy"), ("answer_nll", "answer NLL (nats/token)"))):
                ax = axes[row][j]
                for i, (name, rs) in enumerate(runs.items()):
                    draw(ax, dists, [[task_rows(r, task).get(d, {}).get(key) for d in dists] for r in rs],
                         colors[i % len(colors)], label(name))
                ax.set_xscale("log", base=2)
                ax.set_xticks(dists, [dist_label(d) for d in dists])
                ax.set_ylabel(ylabel)
                if key == "accuracy":
                    ax.set_ylim(-0.05, 1.05)
                    ax.set_title(title + suffix)
                else:
                    ax.set_xlabel("distance (tokens)")
                ax.grid(alpha=0.3)
            axes[0][j].legend()
        fig.tight_layout()
        made["accuracy"] = out / "accuracy_by_distance.png"
        fig.savefig(made["accuracy"], dpi=120)
        plt.close(fig)
    return made


def write_doc(doc: Path, body: str) -> None:
    if not doc.is_file():
        raise ReportError(f"{doc} not found: pass the markdown file to fill with --doc")
    text = doc.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ReportError(f"{doc} must hold the markers {BEGIN} and {END} once each, in that order")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    doc.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}")


def main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "docs" / "long_range"), help="folder of run.sh's result files")
    p.add_argument("--doc", default=str(ROOT / "docs" / "long_range.md"), help="markdown file with the markers")
    p.add_argument("--plots", default=None, help="folder for the PNG plots (default: --results)")
    args = p.parse_args(argv)
    results, doc = Path(args.results).resolve(), Path(args.doc).resolve()
    try:
        runs = load_results(results)
        if not doc.is_file():
            raise ReportError(f"{doc} not found: pass the markdown file to fill with --doc")
        plots = plot(runs, Path(args.plots).resolve() if args.plots else results)
        write_doc(doc, markdown(runs, plots, doc.parent, results))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the tables of {sum(len(v) for v in runs.values())} result files into {doc}; plots: "
          + (", ".join(str(p) for p in plots.values()) or "none (no evaluation reports)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Synthetic recall suite: train attention / RWKV-4 / RRWKV on MQAR or distance-controlled recall.

    python launch/recall.py --task mqar --seq-len 64 --kv-pairs 4 --model rrwkv --interval 8 \\
        --d-model 64 --layers 2 --steps 2000 --lr 1e-3 --batch-size 64 --device cuda --seed 0 --report run.json
    python launch/recall.py --sweep configs/recall/mqar_lr.yaml --out runs/recall/mqar_lr --concurrent 8
    python launch/recall.py --summary runs/recall/mqar_lr

In sweep mode, run options given on the command line (e.g. `--device cpu --steps 20`) override the
grid for every run. The report keys: accuracy, loss, steps, tokens_per_s, state_size, params,
config, curve (and accuracy_by_gap for --task gap); see rrwkv.pretrain.recall.
"""
import argparse
import dataclasses
import sys

from rrwkv.pretrain.cli.common import run_main

HELP = {
    "task": "mqar (Zoology's multi-query associative recall) or gap (recall across G noise tokens)",
    "seq_len": "training sequence length (default 64)",
    "kv_pairs": "key-value pairs per sequence (default 4)",
    "model": "attention | rwkv4 | rrwkv",
    "interval": "rrwkv's medium interval S",
    "d_model": "width (default 64)", "layers": "depth (default 2)",
    "steps": "training steps at most (default 1000; stops early at --target accuracy)",
    "lr": "peak learning rate (default 1e-3)", "batch_size": "sequences per step (default 64)",
    "warmup": "linear warmup steps (default 50)", "weight_decay": "AdamW weight decay on matrices (default 0.1)",
    "grad_clip": "gradient-norm clip, 0 = off (default 1.0)",
    "eval_every": "evaluate every N steps (default 100)",
    "eval_samples": "held-out sequences (and per test gap) (default 512)",
    "eval_batch_size": "sequences per evaluation forward (default: --batch-size)",
    "gaps": "gap task: comma-separated test gaps (default 64,128,...,16384)",
    "target": "early-stop accuracy (default 0.99)", "vocab_size": "vocabulary (default 8192, Zoology's)",
    "power_a": "MQAR's power-law parameter of the query positions (default 0.01)",
    "tie_embeddings": "the output head shares the embedding matrix, true|false (default true, as Zoology)",
    "heads": "attention control's heads (default 0: max(2, d_model // 64))",
    "random_non_queries": "MQAR: random tokens instead of 0 between the queries, true|false (default false, "
                          "as Zoology's figure 2)",
    "device": "cpu | cuda | auto (default auto)", "seed": "seed of weights and data (default 0)",
}


def boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    from rrwkv.pretrain.recall.trainer import RecallConfig
    run = p.add_argument_group("run options (one run, or overrides of every run of a sweep)")
    for f in dataclasses.fields(RecallConfig):
        kind = {"int": int, "float": float, "str": str, "bool": boolean}.get(str(f.type), None)
        if f.name == "gaps":
            kind = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
        choices = {"task": ["mqar", "gap"], "model": ["attention", "rwkv4", "rrwkv"]}.get(f.name)
        run.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None, choices=choices,
                         help=HELP.get(f.name))
    run.add_argument("--report", help="the run's JSON report (written atomically at its end)")
    sweep = p.add_argument_group("sweeps")
    sweep.add_argument("--sweep", metavar="GRID.yaml", help="run every run of a grid (configs/recall/*.yaml)")
    sweep.add_argument("--out", metavar="DIR", help="the sweep's folder: DIR/<run-name>.json and .log")
    sweep.add_argument("--concurrent", type=int, default=1, help="runs at once, each its own process (default 1)")
    sweep.add_argument("--summary", metavar="DIR", help="print the table of a sweep's reports and each model's best lr")
    return p


def run(argv):
    args = parser().parse_args(argv)
    from rrwkv.pretrain.recall.trainer import RecallConfig
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RecallConfig)
             if getattr(args, f.name) is not None}
    if args.summary:
        from rrwkv.pretrain.recall.sweep import summarize
        print(summarize(args.summary))
        return 0
    if args.sweep:
        if not args.out:
            raise ValueError("--sweep needs --out DIR")
        from rrwkv.pretrain.recall.sweep import run_sweep
        return run_sweep(args.sweep, args.out, args.concurrent, given, log=lambda s: print(s, flush=True))
    if not args.report:
        raise ValueError("give --report FILE.json (or --sweep GRID.yaml --out DIR, or --summary DIR)")
    from rrwkv.pretrain.recall.trainer import train, write_json_atomic
    cfg = RecallConfig.from_dict(given)
    print(f"recall run: {cfg.to_dict()}", flush=True)
    report, _ = train(cfg, log=lambda s: print(s, flush=True))
    write_json_atomic(args.report, report)
    print(f"accuracy {report['accuracy']:.4f} after {report['steps']} steps ({report['tokens_per_s']:.0f} tokens/s, "
          f"{report['params']} parameters, state {report['state_size']} floats/layer); report {args.report}", flush=True)
    return 0


def main(argv=None) -> int:
    return run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())

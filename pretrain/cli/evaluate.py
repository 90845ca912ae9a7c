"""Evaluate an exported model: loss, perplexity and loss by position within documents on a shard
directory, and synthetic long-range tasks (passkey retrieval, associative recall) with accuracy by distance.

    python launch/evaluate.py --model MODEL_DIR --data DIR --report FILE.json
        [--max-docs N --max-tokens N --buckets 0,256,1024,... --chunk-len N --batch-size N]
        [--passkey-distances 64,256,1024,4096 --recall-distances ... --task-samples N --task-seed S | --no-tasks]
        [--lm-eval-tasks lambada_openai,hellaswag --lm-eval-limit N --lm-eval-include TASK_DIR]
        [--windows N --window-batch B [--window-len L]]   # training's val_loss, recomputed

(lm-eval alone, with all of its options: rrwkv-lm-eval --model rrwkv --model_args pretrained=MODEL_DIR ...)
"""
import importlib.util
import json
import sys
import time
from pathlib import Path


from rrwkv.pretrain import evaluation as ev
from rrwkv.pretrain.cli.common import ArgumentParser, number, output_file, run_main
from rrwkv.pretrain import tasks
from rrwkv.pretrain.errors import UserError
from rrwkv.pretrain.export import find_tokenizer, load_model, load_tokenizer, parse_dtype
from rrwkv.pretrain.generation import default_dtype, pick_device


def run(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="MODEL_DIR (launch/export.py or launch/convert.py)")
    p.add_argument("--data", required=True,
                   help="shard directory (rrwkv-data tokenize) of held-out text, or `builtin`: the validation "
                        "split of the built-in corpus that configs/tiny.yaml trains on")
    p.add_argument("--cache-dir", default=None, help="with --data builtin: the built-in corpus cache (data.cache_dir; "
                                                     "default $RRWKV_CACHE_DIR or ~/.cache/rrwkv)")
    p.add_argument("--report", required=True, help="JSON file to write")
    p.add_argument("--max-docs", type=number(int, 1), default=None)
    p.add_argument("--max-tokens", type=number(int, 1), default=None,
                   help="stop after documents holding this many tokens")
    p.add_argument("--buckets", default=None, help="position bucket edges (default 0,256,1024,4096,... to the longest)")
    p.add_argument("--chunk-len", type=number(int, 1), default=None,
                   help="positions per forward call, state carried (default ctx_len)")
    p.add_argument("--batch-size", type=number(int, 1), default=8)
    p.add_argument("--passkey-distances", default="64,256,1024,4096")
    p.add_argument("--recall-distances", default="64,256,1024,4096")
    p.add_argument("--recall-pairs", type=number(int, 1), default=8)
    p.add_argument("--task-samples", type=number(int, 1), default=20, help="sequences per distance and task")
    p.add_argument("--task-seed", type=number(int, 0), default=0)
    p.add_argument("--no-tasks", action="store_true", help="skip the synthetic tasks")
    p.add_argument("--windows", type=number(int, 1), default=None, metavar="N",
                   help="also score the first N batches of windows as validation inside training does "
                        "(train.eval_batches; the logged val_loss): docs/training.md, Validation")
    p.add_argument("--window-len", type=number(int, 1), default=None, help="with --windows: data.seq_len "
                                                                           "(default ctx_len)")
    p.add_argument("--window-batch", type=number(int, 1), default=None,
                   help="with --windows: data.micro_batch_size of the run (required: the windows depend on it)")
    p.add_argument("--lm-eval-tasks", default=None, help="comma-separated lm_eval task names (needs lm-eval)")
    p.add_argument("--lm-eval-limit", type=number(int, 1), default=None, help="documents per lm_eval task")
    p.add_argument("--lm-eval-include", action="append", default=[], metavar="DIR",
                   help="a folder of local lm_eval task YAML files (repeatable)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp64 (default: bf16 on GPUs, fp32 on CPUs)")
    args = p.parse_args(argv)
    # Everything that can be wrong with the arguments is found before the evaluation, not after it.
    if (args.window_len or args.window_batch) and not args.windows:
        raise UserError("--window-len and --window-batch go with --windows N")
    if args.windows and not args.window_batch:
        raise UserError("--windows needs --window-batch: the training run's data.micro_batch_size (it decides "
                        "which windows the stream cuts)")
    report_file = output_file(args.report, "--report")
    edges = ev.edges_from_arg(args.buckets)
    passkey = ev.parse_int_list(args.passkey_distances, "--passkey-distances")
    recall = ev.parse_int_list(args.recall_distances, "--recall-distances")
    lm_eval_tasks = [t for t in (args.lm_eval_tasks or "").split(",") if t]
    if args.lm_eval_include and not lm_eval_tasks:
        raise UserError("--lm-eval-include gives folders of lm_eval tasks; name the tasks with --lm-eval-tasks")
    manager = None
    if lm_eval_tasks:
        if importlib.util.find_spec("lm_eval") is None:
            raise UserError("--lm-eval-tasks needs lm-evaluation-harness: pip install -e '.[lm-eval]'")
        from rrwkv.pretrain.lm_eval_adapter import task_manager
        manager = task_manager(lm_eval_tasks, args.lm_eval_include)   # unknown names fail here, not after

    model_dir = Path(args.model)
    device = pick_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else default_dtype(device)[0]
    model = load_model(model_dir, device, dtype)
    tok = load_tokenizer(model_dir)
    chunk = args.chunk_len or model.cfg.ctx_len
    if args.data == "builtin":      # the corpus data.train=builtin made (built now if it is not cached)
        from rrwkv.data_tools.builtin import prepare_builtin_corpus
        args.data = str(prepare_builtin_corpus(args.cache_dir, vocab_size=model.cfg.vocab_size,
                                               say=lambda text: print(text, flush=True)).valid.parent)
    ev.check_data_tokenizer(args.data, find_tokenizer(model_dir), model.cfg.vocab_size)
    seed, n = args.task_seed, args.task_samples
    task_sets = {} if args.no_tasks else {
        "passkey": tasks.passkey_sequences(tok, passkey, n, seed),
        "associative_recall": tasks.recall_sequences(tok, recall, n, args.recall_pairs, seed)}

    t0 = time.perf_counter()
    docs = list(ev.iter_documents(args.data, args.max_docs, args.max_tokens))
    losses = ev.document_losses(model, docs, tok.eos_id, chunk, args.batch_size)
    report = {"model": str(model_dir), "data": str(args.data), "model_config": model.cfg.to_dict(),
              "device": device.type, "dtype": str(dtype).replace("torch.", ""), "chunk_len": chunk,
              **ev.loss_report(losses, edges)}
    report["eval_tokens_per_s"] = report["tokens"] / (time.perf_counter() - t0)
    print(f"loss {report['loss']:.4f} (perplexity {report['perplexity']:.2f}) over {report['tokens']} tokens "
          f"of {report['documents']} documents", flush=True)
    for row in report["loss_by_position"]:
        print(f"  positions {row['bucket']:>9}: loss {row['loss']:.4f} ({row['documents']} documents)", flush=True)

    if args.windows:
        seq_len = args.window_len or model.cfg.ctx_len
        report["windows"] = dict(ev.window_loss(model, ev.training_windows(args.data, seq_len, args.window_batch,
                                                                           args.windows)),
                                 seq_len=seq_len, micro_batch=args.window_batch)
        print(f"training-style windows: loss {report['windows']['loss']:.6f} over {report['windows']['batches']} "
              f"batches of {args.window_batch} x {seq_len} tokens (each from a zero state)", flush=True)

    if task_sets:
        report["tasks"] = {"seed": seed, "samples_per_distance": n}
    for name, sequences in task_sets.items():
        rows = tasks.score_tasks(model, sequences, chunk, args.batch_size)
        report["tasks"][name] = rows
        print(f"{name}: " + ", ".join(f"d={r['distance']} acc {r['accuracy']:.2f}" for r in rows), flush=True)

    if lm_eval_tasks:
        from rrwkv.pretrain.lm_eval_adapter import Scorer, run_lm_eval
        report["lm_eval"] = run_lm_eval(Scorer(model, tok, chunk, args.batch_size), lm_eval_tasks, manager,
                                        args.lm_eval_limit)
    report_file.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report written to {args.report}")


def main(argv=None) -> int:
    return run_main(run, sys.argv[1:] if argv is None else argv)

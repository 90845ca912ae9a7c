"""Start the ranks of a training run on this node, so that a stop request reaches every rank and the
command returns only once their checkpoint is complete.

    rrwkv-launch --nproc-per-node N [--nnodes M --node-rank R --master-addr HOST --master-port P] \
        -- --config configs/X.yaml [key=value ...]

Use it in job scripts and containers (where the launcher may be PID 1 and a stop arrives as SIGTERM
to it alone). SIGTERM, SIGINT and SIGUSR1 to this command, to its process group or to any rank
reach every rank: each saves a checkpoint and exits, and the command returns 75 once all have (the
ranks get --shutdown-timeout seconds, then SIGKILL). DeepSpeed's `deepspeed` runner cannot do this
for a local launch: it returns at once on SIGTERM without telling the ranks (docs/training.md, Faults).
Under SLURM, srun starts the ranks itself (launch/slurm/). This is torch's elastic launcher (torchrun)
with a fixed set of nodes; exit status as rrwkv-pretrain's: 0 done, 2 bad input, 3 too many non-finite
steps, 75 stopped after a checkpoint (start the same command again to continue).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

from ..distributed import free_port
from ..errors import UserError
from ..faults import REQUEUE_EXIT
from .common import ArgumentParser, number, run_main
from .train import catch_signals_early, parse_config


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--nproc-per-node", type=number(int, 1), required=True, help="ranks on this node")
    p.add_argument("--nnodes", type=number(int, 1), default=1)
    p.add_argument("--node-rank", type=number(int, 0), default=0)
    p.add_argument("--master-addr", default="127.0.0.1", help="host of node 0 (reachable from every node)")
    p.add_argument("--master-port", type=number(int, 0, 65535), default=0,
                   help="a free port on node 0 (default: any, one node only)")
    p.add_argument("--shutdown-timeout", type=number(int, 0), default=600,
                   help="seconds the ranks get to save and exit after a stop request (default 600, SLURM's window)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then rrwkv-pretrain's arguments")
    return p


def _requeue_written_since(cfg, start: float) -> bool:
    marker = Path(cfg.run.out_dir) / "REQUEUE"
    return marker.exists() and marker.stat().st_mtime >= start - 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    early = catch_signals_early()                    # until the elastic agent takes them over
    return run_main(lambda a: launch(a, early), list(sys.argv[1:] if argv is None else argv))


def launch(argv: Sequence[str], early: Sequence[int]) -> int:
    args = parser().parse_args(list(argv))
    train_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    if args.node_rank >= args.nnodes or (args.nnodes > 1 and not args.master_port):
        raise UserError("give --node-rank in [0, --nnodes) and, with several nodes, --master-addr and --master-port")
    cfg = parse_config(train_args)                     # bad config: one line here, before any rank starts
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    fields = {f.name for f in dataclasses.fields(LaunchConfig)}
    if not {"signals_to_handle", "shutdown_timeout"} <= fields:
        raise UserError("rrwkv-launch needs a torch whose elastic launcher forwards signals (LaunchConfig."
                        "signals_to_handle, shutdown_timeout); upgrade torch")
    port = args.master_port or free_port()
    config = LaunchConfig(min_nodes=args.nnodes, max_nodes=args.nnodes, nproc_per_node=args.nproc_per_node,
                          run_id=os.environ.get("RRWKV_RUN_ID", uuid.uuid4().hex[:8] if args.nnodes == 1 else "rrwkv"),
                          rdzv_backend="static", rdzv_endpoint=f"{args.master_addr}:{port}",
                          rdzv_configs={"rank": args.node_rank}, max_restarts=0, monitor_interval=0.5,
                          signals_to_handle="SIGTERM,SIGINT,SIGUSR1,SIGHUP", shutdown_timeout=args.shutdown_timeout)
    if early:
        print(f"rrwkv-launch: {signal.Signals(early[0]).name} before any rank started; nothing to save",
              file=sys.stderr, flush=True)
        return REQUEUE_EXIT
    start = time.time()
    try:
        elastic_launch(config, entrypoint=sys.executable)("-u", "-m", "rrwkv.pretrain.cli.train", *train_args)
        return 0
    except SignalException as e:                   # the ranks got the same signal and had their time
        saved = _requeue_written_since(cfg, start)
        print(f"rrwkv-launch: {e.sigval.name}: " + ("every rank saved and exited" if saved else
              "the ranks did not report a saved checkpoint"), file=sys.stderr, flush=True)
        return REQUEUE_EXIT if saved else 1
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        if codes == [REQUEUE_EXIT] or (REQUEUE_EXIT in codes and _requeue_written_since(cfg, start)):
            return REQUEUE_EXIT                        # a signal sent to the ranks themselves
        return next((c for c in codes if c > 0), 1)


if __name__ == "__main__":
    raise SystemExit(main())

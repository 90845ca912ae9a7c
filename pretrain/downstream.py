"""Downstream evaluation during training: lm-eval tasks scored on the trainer's own weights.

Config: train.eval_tasks (lm-eval task names; empty: off), train.eval_tasks_every (steps; the last
step is evaluated too), train.eval_tasks_include (folders of local task YAML files: lm_eval's
include_path), train.eval_tasks_limit (documents per task; 0: all).

No export round trip: the module being trained is scored as it is, in its training precision. Every
data-parallel rank scores its share of the requests (lm_eval's own split through RRWKVLM's rank and
world size) and rank 0 gets the metrics, logged as one row beside the loss:
{"step", "eval_tasks_s", "TASK/METRIC": value, ...} (METRIC/FILTER where lm_eval's filter is not "none").

Layouts: ZeRO 0-2 keep the whole model on every rank. ZeRO-3 keeps a slice of each parameter: the
parameters are gathered, one at a time, into a plain copy of the model on every rank for the
evaluation (one more full model in memory while it runs). Pipeline stages keep different layers on
different ranks: refused when the run starts (evaluate an export with rrwkv-lm-eval instead).
Random states are restored afterwards, so an evaluation changes nothing in the training that follows.
"""
from __future__ import annotations

import importlib.util
import numbers
import time
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig

from .config import ConfigError, model_config
from .errors import UserError


def check(cfg: DictConfig) -> None:
    """What can be wrong with train.eval_tasks before start-up: lm_eval missing, a layout that splits the model."""
    if not cfg.train.eval_tasks:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("train.eval_tasks needs lm-evaluation-harness: pip install -e '.[lm-eval]' "
                        "(or leave train.eval_tasks empty)")
    if cfg.parallel.pipeline_stages > 1:
        raise ConfigError("train.eval_tasks needs the whole model on each rank, which parallel.pipeline_stages > 1 "
                          "splits over stages: leave train.eval_tasks empty and run rrwkv-lm-eval on an export")


class DownstreamEval:
    """The tasks of train.eval_tasks, found once at start-up; `run` scores them on the live model."""

    def __init__(self, cfg: DictConfig):
        from lm_eval.tasks import get_task_dict

        from .lm_eval_adapter import task_manager
        check(cfg)
        self.cfg = cfg
        tasks = list(cfg.train.eval_tasks)
        self.task_dict = get_task_dict(tasks, task_manager(tasks, list(cfg.train.eval_tasks_include)))
        self.tokenizer = None

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.cfg.train.eval_tasks_every == 0 or step == max_steps

    def run(self, engine, tokenizer_path: str, device: torch.device) -> Optional[Dict[str, Any]]:
        """Score the tasks on every rank (together); the row of metrics on rank 0, None on the others."""
        from lm_eval.evaluator import evaluate

        from . import checkpoint
        from .lm_eval_adapter import RRWKVLM, Scorer
        if self.tokenizer is None:
            from rrwkv.data_tools.tokenizer import load_tokenizer
            self.tokenizer = load_tokenizer(tokenizer_path)
        t0 = time.perf_counter()
        rng = checkpoint.rng_state()
        module = engine.module
        was_training = module.training
        model = gathered_copy(module, self.cfg, device) if self.cfg.parallel.zero_stage == 3 else module
        model.eval()
        try:
            for task in leaf_tasks(self.task_dict):   # as lm_eval.simple_evaluate sets them, the same each time
                if task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=FEWSHOT_SEED)
            lm = RRWKVLM(scorer=Scorer(model, self.tokenizer, batch_size=self.cfg.data.micro_batch_size))
            # lm_eval.evaluator.evaluate rather than simple_evaluate: no reseeding of the global random
            # generators, no package inventory (pip list) and no dataset loading at every evaluation.
            res = evaluate(lm, self.task_dict, limit=self.cfg.train.eval_tasks_limit or None, bootstrap_iters=0,
                           log_samples=False)
        finally:
            del model
            module.train(was_training)
            checkpoint.set_rng_state(rng)
        if res is None:                      # not rank 0
            return None
        return {"eval_tasks_s": round(time.perf_counter() - t0, 3), **metrics_row(res["results"])}


FEWSHOT_SEED = 1234                         # lm_eval's default fewshot_random_seed


def leaf_tasks(task_dict):
    """The Task objects of lm_eval's (possibly nested, by group) task dictionary."""
    for value in task_dict.values():
        if isinstance(value, dict):
            yield from leaf_tasks(value)
        elif hasattr(value, "set_fewshot_seed"):
            yield value


def metrics_row(results: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    """lm_eval's results ({task: {"acc,none": 0.5, "acc_stderr,none": "N/A", ...}}) as flat numeric keys."""
    row = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            name = f"{task}/{metric}" if filt in ("", "none") else f"{task}/{metric}/{filt}"
            row[name] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return row


def gathered_copy(module, cfg: DictConfig, device: torch.device):
    """A plain RRWKV holding the whole of a ZeRO-3 partitioned module's weights (on every rank, which
    all gather each parameter together), in the module's precision."""
    import deepspeed

    from .model import RRWKV
    with torch.device("meta"):
        copy = RRWKV(model_config(cfg), init_seed=None)
    dtype = next(module.parameters()).dtype
    copy = copy.to_empty(device=device).to(dtype)
    params = dict(copy.named_parameters())
    with torch.no_grad():
        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                params[name].copy_(p)
    return copy

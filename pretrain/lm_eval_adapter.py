"""lm-evaluation-harness (`lm_eval`) over RRWKV: an exported MODEL_DIR, or the live module of a training run.

`Scorer` holds the three request types of lm_eval's LM interface as batched functions on strings
(usable and tested without lm_eval). `RRWKVLM` is lm_eval's LM over a Scorer; lm_eval finds it by
the name "rrwkv" through the `lm_eval.models` entry point this package declares (pyproject.toml):

    lm_eval --model rrwkv --model_args pretrained=MODEL_DIR[,device=cuda,dtype=bf16] --tasks lambada_openai

lm_eval releases up to 0.4.13 read no entry points (upstream added the `lm_eval.models` group after
it); `rrwkv-lm-eval` (pretrain/cli/lmeval.py) is lm_eval's own command line with the group's models
registered first, so the same arguments work there. Under `torchrun --nproc_per_node N -m
rrwkv.pretrain.cli.lmeval ...` (or `accelerate launch -m ...`) each of the N processes scores its share
of the requests and lm_eval gathers the results.

Every request is scored as a fresh document: the end-of-document token first, as in training.
"""
from __future__ import annotations

import atexit
import os
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .errors import UserError
from .evaluation import first_rows, score_sequences
from .generation import Sampling, sample_next


class GenRequest(NamedTuple):
    """One generation request: continue `context` until a stop string, EOS or `max_gen_toks` tokens."""
    context: str
    until: Tuple[str, ...] = ()
    max_gen_toks: int = 256
    temperature: float = 0.0             # 0: greedy


class Scorer:
    def __init__(self, model, tokenizer, chunk_len: Optional[int] = None, batch_size: int = 8):
        self.model, self.tok = model, tokenizer
        self.chunk_len = chunk_len or model.cfg.ctx_len
        self.batch_size = batch_size

    def _split(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        # A context's trailing spaces belong to the continuation's first word, as lm_eval's HF model does.
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        return [self.tok.eos_id] + self.tok.encode(context), self.tok.encode(continuation)

    def loglikelihood(self, pairs: Sequence[Tuple[str, str]]) -> List[Tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding would write the continuation) per pair.

        Batched by score_sequences: longest first, so each batch holds sequences of similar lengths."""
        split = [self._split(c, x) for c, x in pairs]
        if any(not cont for _, cont in split):
            raise ValueError("a continuation encodes to no tokens; lm_eval requests need non-empty continuations")
        scored = score_sequences(self.model, [c + x for c, x in split], self.chunk_len, self.batch_size,
                                 pad_id=self.tok.eos_id)
        out = []
        for (ctx, cont), s in zip(split, scored):
            span = slice(len(ctx) - 1, len(ctx) - 1 + len(cont))
            out.append((float(s.logprob[span].sum()), bool(s.is_argmax[span].all())))
        return out

    def loglikelihood_rolling(self, texts: Sequence[str]) -> List[float]:
        """log p(text) of whole texts (every token, after the document-start token)."""
        seqs = [[self.tok.eos_id] + self.tok.encode(t) for t in texts]
        scored = score_sequences(self.model, [s for s in seqs if len(s) > 1], self.chunk_len, self.batch_size,
                                 pad_id=self.tok.eos_id)
        it = iter(scored)
        return [float(next(it).logprob.sum()) if len(s) > 1 else 0.0 for s in seqs]

    def generate_batch(self, requests: Sequence[GenRequest], seed: Optional[int] = 0) -> List[str]:
        """Each request's continuation, cut before its first stop string; the same text as one request at
        a time (a sampled row draws from its own generator seeded with `seed`, as generation.generate does).

        Rows run together only if their prompts end at the same position within a segment (the
        recurrent state carries one phase for the whole batch); within such a group, longest first
        in batches of `batch_size`."""
        prompts = [[self.tok.eos_id] + self.tok.encode(r.context) for r in requests]
        interval = self.model.cfg.medium_interval
        groups = defaultdict(list)
        for i, p in enumerate(prompts):
            if requests[i].max_gen_toks > 0:
                groups[len(p) % interval if interval else 0].append(i)
        out = [""] * len(requests)
        for rows in groups.values():
            rows.sort(key=lambda i: -len(prompts[i]))
            for b in range(0, len(rows), self.batch_size):
                idx = rows[b:b + self.batch_size]
                reqs = [requests[i] for i in idx]
                stop = [_StopCheck(self.tok, r.until) for r in reqs]
                ids = generate_rows(self.model, [prompts[i] for i in idx], [r.max_gen_toks for r in reqs],
                                    [r.temperature for r in reqs], self.chunk_len, seed, (self.tok.eos_id,),
                                    lambda j, tokens: stop[j](tokens))
                for j, i in enumerate(idx):
                    out[i] = stop[j].text(ids[j])
        return out

    def generate_until(self, context: str, until: Sequence[str] = (), max_gen_toks: int = 256,
                       temperature: float = 0.0, seed: Optional[int] = 0) -> str:
        """Greedy (or sampled) continuation of one context, cut before the first stop string."""
        return self.generate_batch([GenRequest(context, tuple(until), max_gen_toks, temperature)], seed)[0]


class _StopCheck:
    """Whether a row's generated tokens hold one of its stop strings; its text, cut before the first."""

    def __init__(self, tok, until: Sequence[str]):
        self.tok, self.until = tok, [u for u in until if u]

    def _decode(self, tokens: Sequence[int]) -> str:
        if tokens and tokens[-1] == self.tok.eos_id:
            tokens = tokens[:-1]
        return self.tok.decode(list(tokens))

    def __call__(self, tokens: Sequence[int]) -> bool:
        return bool(self.until) and any(u in self._decode(tokens) for u in self.until)

    def text(self, tokens: Sequence[int]) -> str:
        text = self._decode(tokens)
        cuts = [text.index(u) for u in self.until if u in text]
        return text[:min(cuts)] if cuts else text


def select_rows(state, index):
    """The recurrent state of some rows of a batch (`index`: a list of rows or a slice)."""
    from .model import LayerState, RRWKVState
    pick = lambda t: None if t is None else t[index]  # noqa: E731
    return RRWKVState([LayerState(pick(l.att_x), pick(l.ffn_x), l.wkv.select(index), pick(l.att_sum),
                                  pick(l.ffn_sum), pick(l.gate)) for l in state.layers])


def cat_rows(states):
    """States of row blocks, stacked into one batch (all at the same phase)."""
    from .model import LayerState, RRWKVState
    from rrwkv.kernels.wkv import WKVState
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    layers = []
    for ls in zip(*(s.layers for s in states)):
        ws = [l.wkv for l in ls]
        if len({w.phase for w in ws}) != 1:
            raise ValueError("rows at different positions within a segment cannot share one recurrent state")
        wkv = WKVState(*(cat([getattr(w, f) for w in ws]) for f in ("aa", "bb", "pp", "ma", "mb", "mp")),
                       phase=ws[0].phase)
        layers.append(LayerState(cat([l.att_x for l in ls]), cat([l.ffn_x for l in ls]), wkv,
                                 cat([l.att_sum for l in ls]), cat([l.ffn_sum for l in ls]),
                                 cat([l.gate for l in ls])))
    return RRWKVState(layers)


@torch.no_grad()
def prefill_rows(model, prompts: Sequence[Sequence[int]], chunk_len: int):
    """Run prompts of different lengths (longest first) through the chunked mode together; returns the
    logits of each prompt's last position (B, V) and the state after it, rows in the given order.

    Chunks are also cut where a prompt ends, so each row's state is taken right after its own last
    token (no padding ever enters a state); rows leave the batch as their prompt ends."""
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    if lengths != sorted(lengths, reverse=True) or lengths[-1] < 1:
        raise ValueError("prefill_rows takes non-empty prompts, longest first")
    ids = torch.zeros(len(prompts), lengths[0], dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    ids = ids.to(device)
    done = []                                       # (logits, state) of row blocks, shortest first
    state, running, start = None, len(prompts), 0
    while running:
        end = min(start + chunk_len, lengths[running - 1])
        logits, state = model(ids[:running, start:end], state, return_state=True)
        still = sum(1 for n in lengths[:running] if n > end)
        if still < running:
            done.append((logits[still:running, -1], select_rows(state, slice(still, running))))
            state = first_rows(state, still) if still else None
        running, start = still, end
    done.reverse()
    return torch.cat([d[0] for d in done]), cat_rows([d[1] for d in done])


@torch.no_grad()
def generate_rows(model, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                  temperatures: Sequence[float], chunk_len: int, seed: Optional[int] = 0,
                  stop_ids: Sequence[int] = (), stop: Optional[Callable[[int, List[int]], bool]] = None
                  ) -> List[List[int]]:
    """Token ids continuing each prompt (longest first; one phase), one `model.step` for all rows a token.

    A row ends after a token of `stop_ids`, after max_new_tokens[row] tokens, or once stop(row, its
    tokens) is true; it then leaves the batch. A row with temperature 0 is greedy; another samples
    from its own torch.Generator seeded with `seed`, so each row gets what generation.generate gives it."""
    device = next(model.parameters()).device
    logits, state = prefill_rows(model, prompts, chunk_len)
    gens = {}
    for r, t in enumerate(temperatures):
        if t > 0:
            gens[r] = torch.Generator(device=device)
            if seed is not None:
                gens[r].manual_seed(int(seed))
    out: List[List[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))              # batch row j -> prompt active[j]
    while active:
        tokens = logits.float().argmax(-1)
        for j, r in enumerate(active):
            if r in gens:
                tokens[j] = sample_next(logits[j:j + 1], Sampling(temperature=temperatures[r]), gens[r])[0]
        keep = []
        for j, r in enumerate(active):
            t = int(tokens[j])
            out[r].append(t)
            if t not in stop_ids and len(out[r]) < max_new_tokens[r] and not (stop and stop(r, out[r])):
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(active):
            state, tokens, active = select_rows(state, keep), tokens[keep], [active[j] for j in keep]
        logits, state = model.step(tokens, state)
    return out


def load_scorer(model_dir: str | Path, device: str | torch.device = "auto", dtype: Optional[str] = None,
                batch_size: int = 8, chunk_len: Optional[int] = None) -> Scorer:
    from .export import load_model, load_tokenizer, parse_dtype
    from .generation import default_dtype, pick_device
    dev = device if isinstance(device, torch.device) else pick_device(device)
    dt = parse_dtype(dtype) if dtype else default_dtype(dev)[0]
    return Scorer(load_model(Path(model_dir), dev, dt), load_tokenizer(Path(model_dir)), chunk_len, batch_size)


def join_launched_processes(device: Optional[str]) -> Tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; started by torchrun / accelerate launch (WORLD_SIZE > 1),
    it joins their process group (gloo on CPUs, nccl on GPUs), each process on the GPU of its local rank."""
    from .generation import pick_device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    name = device or "auto"
    if name.startswith("cuda") and not torch.cuda.is_available():   # lm_eval's command line says cuda:0
        print(f"warning: device {name} asked for, but no CUDA device is visible: running on the CPU",
              file=sys.stderr, flush=True)
        name = "cpu"
    dev = pick_device(name)
    if world > 1 and dev.type == "cuda":            # one GPU per process, whatever index was given
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    import torch.distributed as dist
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return (*process_rank(), dev)


def process_rank() -> Tuple[int, int]:
    """(rank, world size) in the default process group; (0, 1) without one."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def positive_int(value, name: str, auto: Optional[int] = None) -> int:
    """A model_args integer; with `auto`, lm_eval's batch_size=auto / auto:N also (no search here: `auto`)."""
    text = str(value)
    if auto is not None and text.startswith("auto"):
        return auto
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"model_args {name}={value}: give a positive integer")
    return int(text)


try:  # lm_eval is optional: the adapter exists only where it is installed
    from lm_eval.api.model import LM as _LM
    from lm_eval.api.registry import register_model as _register_model
except ImportError:
    _LM = None

if _LM is not None:
    @_register_model("rrwkv")
    class RRWKVLM(_LM):
        """lm_eval's LM interface over RRWKV.

        model_args: pretrained (or model_dir) = MODEL_DIR, device (auto | cpu | cuda | cuda:N), dtype
        (fp32 | bf16 | fp64; default bf16 on GPUs, fp32 on CPUs), batch_size, chunk_len (positions per
        forward call, default ctx_len). Started as several processes (torchrun, accelerate launch),
        each scores its share of the requests: rank and world_size are lm_eval's data-parallel split.
        `scorer=` (from Python) evaluates a model already in memory, e.g. the trainer's own weights.
        """

        ARGS = ("pretrained", "model_dir", "device", "dtype", "batch_size", "max_batch_size", "chunk_len")

        def __init__(self, pretrained: Optional[str] = None, model_dir: Optional[str] = None,
                     device: Optional[str] = None, dtype: Optional[str] = None, batch_size: int | str = 8,
                     max_batch_size: Optional[int] = None, chunk_len: Optional[int] = None,
                     scorer: Optional[Scorer] = None, **unknown):
            super().__init__()
            if unknown:
                raise UserError(f"model_args {', '.join(sorted(unknown))}: the rrwkv model takes "
                                f"{', '.join(self.ARGS)}")
            if scorer is not None:           # a model in memory, in this process's group if it has one
                self._rank, self._world_size = process_rank()
                self._device = next(scorer.model.parameters()).device
            else:
                if pretrained and model_dir and str(pretrained) != str(model_dir):
                    raise UserError("model_args pretrained and model_dir name two folders; give one of them")
                path = pretrained or model_dir
                if not path:
                    raise UserError("the rrwkv model needs model_args pretrained=MODEL_DIR (a folder written by "
                                    "rrwkv-export or rrwkv-convert)")
                size = positive_int(batch_size, "batch_size", auto=32)
                if max_batch_size:
                    size = min(size, positive_int(max_batch_size, "max_batch_size"))
                chunk = positive_int(chunk_len, "chunk_len") if chunk_len else None
                from .export import load_config
                load_config(Path(path), "model_args pretrained=")     # its error names the argument
                self._rank, self._world_size, self._device = join_launched_processes(device)
                scorer = load_scorer(path, self._device, dtype, size, chunk)
            self.scorer = scorer

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood([r.args for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False):
            batch = []
            for r in requests:
                context, kwargs = r.args
                until = kwargs.get("until") or ()
                until = (until,) if isinstance(until, str) else tuple(until)
                temp = float(kwargs.get("temperature", 0.0) or 0.0) if kwargs.get("do_sample") else 0.0
                batch.append(GenRequest(context, until, int(kwargs.get("max_gen_toks", 256)), temp))
            return self.scorer.generate_batch(batch)

        # lm_eval's data-parallel primitives (evaluator.evaluate pads, splits and gathers through them).
        def all_gather(self, tensor):
            import torch.distributed as dist
            if self._world_size == 1:
                return tensor
            parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
            dist.all_gather(parts, tensor.contiguous())
            return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

        def gather_object(self, obj, dst: int = 0):
            import torch.distributed as dist
            if self._world_size == 1:
                return [obj]
            out = [None] * self._world_size if self._rank == dst else None
            dist.gather_object(obj, out, dst=dst)
            return out

        def barrier(self) -> None:
            import torch.distributed as dist
            if self._world_size > 1:
                dist.barrier()

        @property
        def accelerator(self):
            """What lm_eval 0.4.10-0.4.11 call instead of all_gather and barrier (no `accelerate` needed)."""
            return SimpleNamespace(gather=self.all_gather, wait_for_everyone=self.barrier)
else:
    RRWKVLM = None


def run_lm_eval(scorer: Scorer, tasks: Sequence[str], manager=None, limit: Optional[int] = None) -> dict:
    """lm_eval.simple_evaluate of these tasks (found by `manager`, a task_manager) on a Scorer's model;
    returns its `results` (per task metrics)."""
    if _LM is None:
        raise UserError("lm_eval tasks need lm-evaluation-harness: pip install -e '.[lm-eval]'")
    import lm_eval
    res = lm_eval.simple_evaluate(model=RRWKVLM(scorer=scorer), tasks=list(tasks), limit=limit,
                                  task_manager=manager or task_manager(tasks))
    return res["results"] if res is not None else {}


def task_manager(tasks: Sequence[str], include_path: Sequence[str] = ()):
    """lm_eval's TaskManager for these task names. When local folders define them all, only those are
    indexed (lm_eval's own ~15k task files take seconds to index); otherwise all, and an unknown name
    is an error that says where tasks come from."""
    from lm_eval.tasks import TaskManager
    paths = [str(Path(p)) for p in include_path]
    for p in paths:
        if not Path(p).is_dir():
            raise UserError(f"lm-eval task folder {p} not found; give a folder of task YAML files")
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        import difflib
        near = {t: difflib.get_close_matches(t, manager.all_tasks, n=1) for t in unknown}
        hint = "; ".join(f"did you mean '{n[0]}' for '{t}'" for t, n in near.items() if n)
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}" + (f" ({hint})" if hint else "")
                        + "; `lm_eval ls tasks` lists them, and local task YAML folders are given as include paths")
    return manager

"""lm-evaluation-harness (`lm_eval`) scoring of an exported MODEL_DIR.

`Scorer` holds the three request types of lm_eval's LM interface as plain functions on strings
(usable and tested without lm_eval). When `lm_eval` is installed, importing this module also
registers `RRWKVLM` under the name "rrwkv", so

    lm_eval --model rrwkv --model_args model_dir=MODEL_DIR,device=cuda --tasks lambada_openai \\
            --include_path . (or: python launch/evaluate.py ... --lm-eval-tasks lambada_openai)

works once this module is imported (launch/evaluate.py does it). Every request is scored as a
fresh document: the end-of-document token first, as in training.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple


from .evaluation import score_sequences
from .generation import Sampling, generate


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
        """(log p(continuation | context), whether greedy decoding would write the continuation) per pair."""
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

    def generate_until(self, context: str, until: Sequence[str] = (), max_gen_toks: int = 256,
                       temperature: float = 0.0, seed: Optional[int] = 0) -> str:
        """Greedy (or sampled) continuation, cut before the first stop string."""
        prompt = [self.tok.eos_id] + self.tok.encode(context)
        ids: List[int] = []
        text = ""
        for t in generate(self.model, prompt, max_gen_toks, Sampling(temperature=temperature), seed,
                          self.chunk_len, stop_ids=(self.tok.eos_id,)):
            if t == self.tok.eos_id:
                break
            ids.append(t)
            text = self.tok.decode(ids)
            if any(u and u in text for u in until):
                break
        cuts = [text.index(u) for u in until if u and u in text]
        return text[:min(cuts)] if cuts else text


def load_scorer(model_dir: str | Path, device: str = "auto", dtype: Optional[str] = None,
                batch_size: int = 8) -> Scorer:
    from .export import load_model, load_tokenizer, parse_dtype
    from .generation import default_dtype, pick_device
    dev = pick_device(device)
    dt = parse_dtype(dtype) if dtype else default_dtype(dev)[0]
    return Scorer(load_model(Path(model_dir), dev, dt), load_tokenizer(Path(model_dir)), batch_size=batch_size)


try:  # lm_eval is optional: the adapter exists only where it is installed
    from lm_eval.api.model import LM as _LM
    from lm_eval.api.registry import register_model as _register_model
except ImportError:
    _LM = None

if _LM is not None:
    @_register_model("rrwkv")
    class RRWKVLM(_LM):
        """lm_eval's LM interface over an exported RRWKV MODEL_DIR (model_args: model_dir, device, dtype, batch_size)."""

        def __init__(self, model_dir: str, device: str = "auto", dtype: Optional[str] = None,
                     batch_size: int | str = 8, **_):
            super().__init__()
            self.scorer = load_scorer(model_dir, device, dtype, int(batch_size) if str(batch_size).isdigit() else 8)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood([r.args for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for r in requests:
                context, kwargs = r.args
                until = kwargs.get("until", [])
                until = [until] if isinstance(until, str) else list(until)
                temp = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
                out.append(self.scorer.generate_until(context, until, int(kwargs.get("max_gen_toks", 256)), temp))
            return out


def run_lm_eval(model_dir: Path, tasks: Sequence[str], device: str = "auto", dtype: Optional[str] = None,
                batch_size: int = 8, limit: Optional[int] = None) -> dict:
    """lm_eval.simple_evaluate on this model; returns its `results` (per task metrics)."""
    if _LM is None:
        raise ValueError("--lm-eval-tasks needs lm-evaluation-harness: pip install lm-eval")
    import lm_eval
    lm = RRWKVLM(str(model_dir), device, dtype, batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
    return res["results"]

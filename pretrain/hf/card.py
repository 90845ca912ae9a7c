"""The model card (README.md) of an HF_DIR: YAML front matter for the Hub, the shape, how to load it, and the
training config and evaluation reports that come with the MODEL_DIR.

What a MODEL_DIR may carry besides its weights (all optional):
- `training_config.yaml`: the run's resolved config. Without it, the `config.yaml` of the run the weights
  were exported from (found through the `source` that launch/export.py records) when it still exists.
- `*.json` reports of launch/evaluate.py (`--report MODEL_DIR/eval.json`): any JSON object there with
  `loss` and `perplexity`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

TRAINING_CONFIG = "training_config.yaml"
NOT_REPORTS = {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
               "special_tokens_map.json"}


def training_config(model_dir: Path, metadata: Dict[str, str]) -> Optional[Path]:
    """The training config that belongs to a MODEL_DIR, if there is one (see the module docstring)."""
    own = Path(model_dir) / TRAINING_CONFIG
    if own.is_file():
        return own
    source = metadata.get("source")
    if source:   # OUT_DIR/checkpoints/step<N>
        run_config = Path(source).parent.parent / "config.yaml"
        if run_config.is_file():
            return run_config
    return None


def eval_reports(model_dir: Path) -> Dict[str, dict]:
    """{file name: report} of the launch/evaluate.py reports in a MODEL_DIR."""
    reports = {}
    for path in sorted(Path(model_dir).glob("*.json")):
        if path.name in NOT_REPORTS:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and {"loss", "perplexity"} <= set(data):
            reports[path.name] = data
    return reports


def _num(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _report_section(name: str, r: dict) -> str:
    lines = [f"### `{name}`", "", f"Data: `{r.get('data', '?')}`; {r.get('tokens', '?')} tokens of "
             f"{r.get('documents', '?')} documents ({r.get('dtype', '?')} on {r.get('device', '?')}).", "",
             "| metric | value |", "|---|---|", f"| loss | {_num(r['loss'])} |",
             f"| perplexity | {_num(r['perplexity'])} |"]
    by_pos = r.get("loss_by_position") or []
    if by_pos:
        lines += ["", "| positions | loss | documents |", "|---|---|---|"]
        lines += [f"| {row.get('bucket')} | {_num(row.get('loss'))} | {row.get('documents')} |" for row in by_pos]
    tasks = r.get("tasks") or {}
    for task, rows in tasks.items():
        if isinstance(rows, list) and rows:
            lines += ["", f"{task}: " + ", ".join(f"distance {row.get('distance')} accuracy {_num(row.get('accuracy'))}"
                                                  for row in rows)]
    if r.get("lm_eval"):
        lines += ["", "lm-eval:", "", "```json", json.dumps(r["lm_eval"], indent=2)[:4000], "```"]
    return "\n".join(lines)


def model_card(name: str, config: dict, metadata: Dict[str, str], train_config: Optional[str],
               reports: Dict[str, dict]) -> str:
    """README.md text for an HF_DIR named `name` holding a model of RRWKVConfig fields `config`."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results = [EvalResult(task_type="text-generation", dataset_type="custom",
                          dataset_name=Path(str(r.get("data", file))).name or file, metric_type="perplexity",
                          metric_value=float(r["perplexity"]), metric_name=f"perplexity ({file})")
               for file, r in reports.items()]
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         tags=["rrwkv", "rwkv", "recurrent", "custom_code"],
                         **({"model_name": name, "eval_results": results} if results else {}))
    s = config["medium_interval"]
    kind = f"mediums every {s} tokens" if s else "medium_interval 0: exactly RWKV-4"
    trained = ""
    if metadata.get("step"):
        trained = f" It was exported at training step {metadata['step']}" + \
            (f" ({metadata['tokens']} tokens)." if metadata.get("tokens") else ".")
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in config.items())
    body = f"""
# {name}

An **RRWKV** language model ({kind}): RWKV-4 plus *mediums* (RRWKV, arXiv 2306.05176), squeezed
summaries of past segments that later tokens look back at through a slower recurrence, and an
excitation gate. Trained with rrwkv-pretrain and exported with its `launch/convert.py --to hf-rrwkv`.{trained}

| field | value |
|---|---|
{rows}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("PATH_OR_REPO", trust_remote_code=True)  # transformers 5 reads the config
model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
ids = tok("def parse(", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=50, do_sample=False)[0]))
```

The modeling code ships beside the weights (`modeling_rrwkv.py`, pure PyTorch). It is a recurrent model: the
cache is its state (`out.state`; `model(next_ids, state=out.state)` continues the sequence), memory is constant
per token and there is no length limit (`ctx_len` is the training window). It has no attention mask, so the
sequences of a batch must have equal lengths (no padding). With `pip install rrwkv-pretrain` on a CUDA
machine the WKV recurrence runs rrwkv's CUDA kernel.

Back into rrwkv-pretrain (e.g. to continue pretraining with `run.init_from=MODEL_DIR`):

```bash
python launch/convert.py --from hf-rrwkv --input HF_DIR --output MODEL_DIR
```
"""
    if train_config is not None:
        body += f"\n## Training config\n\n`{TRAINING_CONFIG}`:\n\n```yaml\n{train_config.rstrip()}\n```\n"
    if reports:
        body += "\n## Evaluation (launch/evaluate.py)\n\n" + "\n\n".join(
            _report_section(f, r) for f, r in reports.items()) + "\n"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))

"""Documents of the local lm-eval test tasks: the JSON lines file named like the task, beside this one
(a task YAML's `custom_dataset: !function docs.NAME`, so no path depends on the working directory)."""
import json
from pathlib import Path

import datasets


def _load(name: str) -> datasets.DatasetDict:
    lines = (Path(__file__).parent / f"{name}.jsonl").read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(l) for l in lines if l.strip()])})


def python_choice(**_):
    return _load("python_choice")


def python_complete(**_):
    return _load("python_complete")

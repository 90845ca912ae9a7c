"""The synthetic recall suite (GitHub issue #19): MQAR and distance-controlled recall as token ids,
the attention / RWKV-4 / RRWKV models at matched parameters, a light trainer for many small runs,
and resumable sweeps over grids (configs/recall/*.yaml). The program is `launch/recall.py`.

- tasks:   mqar_batch, gap_batch (vectorized, seeded, on any device)
- models:  build_model, AttentionLM, state_size, answer_logits (chunked with carried state)
- trainer: RecallConfig, train, write_json_atomic
- sweep:   expand, run_sweep, summarize
"""
from .models import AttentionLM, answer_logits, build_model, state_size
from .tasks import RecallBatch, gap_batch, mqar_batch
from .trainer import RecallConfig, train, write_json_atomic

__all__ = ["AttentionLM", "RecallBatch", "RecallConfig", "answer_logits", "build_model", "gap_batch",
           "mqar_batch", "state_size", "train", "write_json_atomic"]

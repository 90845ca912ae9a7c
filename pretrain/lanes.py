"""Layout-invariant training batches: row i of every global batch comes from lane i.

The corpus is cut into `global_batch_size` lanes, each a contiguous token range read as one
TokenStream of one sequence per batch (rank = lane, world_size = lanes). A data-parallel rank owns
the lanes of its rows: with R ranks, G accumulation steps and micro-batch M, micro-batch j of rank
r holds lanes (r*G + j)*M ... (r*G + j + 1)*M - 1. So the global batch of every step is the same
whatever R, G and M are: the same seed and data give the same losses on 1 process or 8 GPUs, with
any micro-batch size, and a checkpoint (which records every lane's position) resumes on a
different number of ranks.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch

from .data import TokenStream


class LaneBatches:
    """This rank's micro-batches, (input_ids, labels) LongTensors (micro_batch_size, seq_len)."""

    def __init__(self, source, seq_len: int, micro_batch_size: int, grad_accum: int, dp_rank: int,
                 dp_size: int, seed: int, max_epochs: Optional[int] = None):
        self.lanes_total = micro_batch_size * grad_accum * dp_size
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        first = dp_rank * grad_accum * micro_batch_size
        self.lanes: List[int] = list(range(first, first + grad_accum * micro_batch_size))
        self.streams: Dict[int, TokenStream] = {
            lane: TokenStream(source, seq_len, 1, rank=lane, world_size=self.lanes_total, num_workers=0,
                              seed=seed, max_epochs=max_epochs) for lane in self.lanes}
        self._iters: Optional[Dict[int, Iterator]] = None

    def state_dict(self) -> Dict[int, dict]:
        """Position of each of this rank's lanes (merge the dicts of all ranks to get every lane)."""
        return {lane: s.state_dict() for lane, s in self.streams.items()}

    def load_state_dict(self, lanes: Dict[int, dict]) -> None:
        missing = [lane for lane in self.lanes if lane not in lanes and str(lane) not in lanes]
        if missing:
            raise ValueError(f"the checkpoint has no data position for lanes {missing[:4]}...: it was written "
                             f"with a different train.global_batch_size; resume with the same global batch size")
        for lane, s in self.streams.items():
            s.load_state_dict(lanes[lane] if lane in lanes else lanes[str(lane)])
        self._iters = None

    def corrupt_shards(self) -> int:
        """Shard reads that failed and were skipped (each warned about by name), over this rank's lanes."""
        return sum(s.stats()["corrupt_shards"] for s in self.streams.values())

    def next_step(self) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """The grad_accum micro-batches of the next optimizer step, or None when the data ran out."""
        if self._iters is None:
            self._iters = {lane: iter(s) for lane, s in self.streams.items()}
        micro = []
        M = self.micro_batch_size
        for j in range(self.grad_accum):
            rows = []
            for lane in self.lanes[j * M:(j + 1) * M]:
                try:
                    rows.append(next(self._iters[lane]))
                except StopIteration:
                    return None
            micro.append((torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])))
        return micro

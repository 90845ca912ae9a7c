"""Pipeline parallelism: RRWKV as a DeepSpeed PipelineModule of layer specs.

Embedding, each block and the head are separate layers, built only on the stage that owns them
(LayerSpec), each initialized from its own seed (pretrain/model.py's per-layer init), so a pipeline
run starts from the same weights as a single-process run. The model file knows nothing of this.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .loss import lm_loss
from .model import Block, RRWKVConfig, init_block, init_embedding, init_head


class EmbeddingPipe(nn.Module):
    def __init__(self, cfg: RRWKVConfig, seed: int):
        super().__init__()
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        init_embedding(self.emb, cfg, seed)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.emb(idx)


class BlockPipe(Block):
    def __init__(self, cfg: RRWKVConfig, layer_id: int, seed: int):
        super().__init__(cfg, layer_id)
        init_block(self, cfg, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pipeline stages pass one tensor
        return super().forward(x)[0]


class HeadPipe(nn.Module):
    def __init__(self, cfg: RRWKVConfig, seed: int):
        super().__init__()
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        init_head(self.head, cfg, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_out(x))


def pipeline_model(cfg: RRWKVConfig, stages: int, seed: int, activation_checkpointing: bool,
                   partition_method: str = "parameters", l2wrap: bool = False):
    """A PipelineModule over `stages` stages (DeepSpeed's process groups must exist)."""
    from deepspeed.pipe import LayerSpec, PipelineModule

    layers = [LayerSpec(EmbeddingPipe, cfg, seed)]
    layers += [LayerSpec(BlockPipe, cfg, i, seed) for i in range(cfg.n_layer)]
    layers += [LayerSpec(HeadPipe, cfg, seed)]
    from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint

    loss_fn = functools.partial(lm_loss, l2wrap=l2wrap)
    # Recompute blocks only (never the embedding, whose input needs no grad), non-reentrant.
    return PipelineModule(layers=layers, num_stages=stages, loss_fn=loss_fn, partition_method=partition_method,
                          activation_checkpoint_interval=1 if activation_checkpointing else 0,
                          activation_checkpoint_func=non_reentrant_checkpoint, checkpointable_layers=["BlockPipe"])


def data_parallel_rank(pipe) -> int:
    return pipe._grid.get_data_parallel_id()

"""The public WKV-retrospection op: validates arguments and dispatches CUDA or the reference."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import cuda as _cuda   # the CUDA backend; its extension is built on first use, not on import
from .reference import wkv_retro_reference
from .state import WKVState, num_mediums

# Set by the CUDA backend module (kernels.cuda) when it is importable; the model can force the
# reference with use_cuda_kernel(False) (config switch `model.cuda_kernel`).
_CUDA_ENABLED = True


def use_cuda_kernel(enabled: bool) -> None:
    """Turn the CUDA kernel on or off for CUDA tensors (off: the reference runs on the GPU), and its
    host build for CPU inference (off: the reference runs there too)."""
    global _CUDA_ENABLED
    _CUDA_ENABLED = bool(enabled)


def wkv_retro(time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              medium_decay: Optional[torch.Tensor] = None, mk: Optional[torch.Tensor] = None,
              mv: Optional[torch.Tensor] = None, interval: int = 0,
              state: Optional[WKVState] = None) -> Tuple[torch.Tensor, WKVState]:
    """WKV with retrospection over one chunk (rrwkv.md, interfaces.md).

    time_decay, time_first, medium_decay: (C,); k, v: (B, T, C); mk, mv: (B, J, C) with
    J = ceil((phase + T) / interval), mk[:, 0] the medium of the segment in progress at the
    chunk's start. Returns y (B, T, C) in k's dtype and the state after the chunk.
    """
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"wkv_retro: k and v must both be (B, T, C); got {tuple(k.shape)} and {tuple(v.shape)}")
    B, T, C = k.shape
    if time_decay.shape != (C,) or time_first.shape != (C,):
        raise ValueError(f"wkv_retro: time_decay and time_first must be ({C},)")
    if interval < 0:
        raise ValueError(f"wkv_retro: interval must be >= 0, got {interval}")
    phase = 0 if state is None else state.phase
    if interval > 0:
        J = num_mediums(phase, T, interval)
        if medium_decay is None or mk is None or mv is None:
            raise ValueError("wkv_retro: interval > 0 needs medium_decay, mk and mv")
        if mk.shape != (B, J, C) or mv.shape != (B, J, C):
            raise ValueError(f"wkv_retro: mk and mv must be (B, J, C) = {(B, J, C)} for phase {phase}, "
                             f"T {T}, interval {interval}; got {tuple(mk.shape)} and {tuple(mv.shape)}")
    if (k.is_cuda and _CUDA_ENABLED) or (k.device.type == "cpu" and torch.compiler.is_compiling()):
        # Inside torch.compile the op must be the custom op (a graph without a break); on the CPU that
        # is the kernels' arithmetic built for the host (kernels.build.load_wkv_host_extension).
        return _cuda.wkv_retro_cuda(time_decay, time_first, k, v, medium_decay, mk, mv, interval, state)
    if k.device.type == "cpu" and _CUDA_ENABLED and not torch.is_grad_enabled() and _host_inference_ok():
        # Inference on a CPU (evaluation, validation, generation: no autograd): the host build of the
        # kernels' arithmetic, about 9x the reference's speed at (8, 256, 128) (docs/performance.md).
        try:
            return _cuda.wkv_retro_cuda(time_decay, time_first, k, v, medium_decay, mk, mv, interval, state)
        except (OSError, RuntimeError, ImportError) as e:          # no C++ compiler, a failed build
            _host_inference_failed(e)
    return wkv_retro_reference(time_decay, time_first, k, v, medium_decay, mk, mv, interval, state)


_HOST_STATE = {"failed": False}


def _host_inference_ok() -> bool:
    return not _HOST_STATE["failed"]


def _host_inference_failed(error: Exception) -> None:
    """The host build could not be made or loaded: the reference serves from now on (said once)."""
    import warnings
    _HOST_STATE["failed"] = True
    warnings.warn(f"the WKV op's CPU build is unavailable ({type(error).__name__}: {str(error)[:200]}); CPU "
                  f"inference uses the slower PyTorch reference", RuntimeWarning, stacklevel=3)

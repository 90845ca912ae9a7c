"""WKV-retrospection op: CUDA kernel on CUDA tensors, pure-PyTorch reference elsewhere."""
from .state import WKVState, num_mediums
from .wkv import use_cuda_kernel, wkv_retro

__all__ = ["wkv_retro", "WKVState", "num_mediums", "use_cuda_kernel"]

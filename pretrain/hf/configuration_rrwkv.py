"""The Hugging Face config of an RRWKV model (remote code: `AutoConfig.from_pretrained(..., trust_remote_code=True)`).

The fields are rrwkv-pretrain's RRWKVConfig fields under their own names; `hidden_size`,
`num_hidden_layers` and `max_position_embeddings` are aliases for n_embd, n_layer and ctx_len.
"""
from transformers import PretrainedConfig


class RRWKVConfig(PretrainedConfig):
    """RWKV-4 with retrospection: mediums every `medium_interval` tokens (0 = exactly RWKV-4)."""

    model_type = "rrwkv"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "max_position_embeddings": "ctx_len"}

    def __init__(self, vocab_size: int = 2048, n_layer: int = 4, n_embd: int = 128, ctx_len: int = 256,
                 medium_interval: int = 64, se_reduction: int = 16, ffn_mult: int = 4, layer_norm_epsilon: float = 1e-5,
                 use_cuda_kernel: bool = True, use_cache: bool = True, bos_token_id=None, eos_token_id=None,
                 tie_word_embeddings: bool = False, **kwargs):
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.n_embd = n_embd
        self.ctx_len = ctx_len                  # the training window; the model itself has no length limit
        self.medium_interval = medium_interval  # s; 0 = plain RWKV-4 (no mediums, no excitation)
        self.se_reduction = se_reduction        # excitation hidden width = n_embd // se_reduction
        self.ffn_mult = ffn_mult                # channel-mix hidden width = ffn_mult * n_embd
        self.layer_norm_epsilon = layer_norm_epsilon
        self.use_cuda_kernel = use_cuda_kernel  # rrwkv's CUDA WKV kernel on CUDA tensors, when rrwkv is installed
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def se_hidden(self) -> int:
        return max(1, self.n_embd // self.se_reduction)


__all__ = ["RRWKVConfig"]

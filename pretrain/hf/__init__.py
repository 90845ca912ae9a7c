"""RRWKV as a Hugging Face `transformers` model of any medium interval (remote code, `trust_remote_code=True`).

- configuration_rrwkv.py, modeling_rrwkv.py: the remote code itself, copied verbatim into every HF_DIR.
  A distribution artifact: self-contained (transformers and torch only; rrwkv's CUDA kernel is used when
  installed), so it imports nothing of this package; tests/test_hf_rrwkv.py keeps its math equal to
  pretrain/model.py's.
- convert.py: MODEL_DIR -> HF_DIR (`launch/convert.py --to hf-rrwkv`) and back (`--from hf-rrwkv`).
- card.py: the HF_DIR's README.md (model card).

Nothing is imported here, so that `import rrwkv.pretrain.hf` loads neither transformers nor torch.
"""

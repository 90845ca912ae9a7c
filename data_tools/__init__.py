"""Data preprocessing for RRWKV: tokenizer training, sharded tokenization, inspection.

    python -m data_tools train-tokenizer --input FILES... --vocab-size N --output PREFIX
    python -m data_tools tokenize --input FILES... --tokenizer PREFIX.model --output DIR --workers N
    python -m data_tools inspect DIR

This package imports no torch, so preprocessing jobs start fast and run without a GPU stack.
"""

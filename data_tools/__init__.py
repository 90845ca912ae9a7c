"""Data preprocessing for RRWKV: tokenizer training, sharded tokenization, inspection.

    python -m data_tools train-tokenizer --input FILES... --vocab-size N --output PREFIX
    python -m data_tools tokenize --input FILES... --tokenizer PREFIX.model --output DIR --workers N
    python -m data_tools inspect DIR
    python -m data_tools verify DIR                     # files, sha256, counts vs the manifest
    python -m data_tools merge DIR... --output DIR      # combine separately made shard sets
    python -m data_tools import-binidx --input PREFIX --tokenizer TOK --output DIR
    sbatch --array=0-K launch/slurm/preprocess.sbatch --input ... --tokenizer ... --output DIR

This package imports no torch, so preprocessing jobs start fast and run without a GPU stack.
"""

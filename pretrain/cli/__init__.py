"""The command-line programs, installed as `rrwkv-*` console scripts; `launch/*.py` call the same `main`s.

Each module imports only what its `--help` needs at the top; the heavy stack (torch, DeepSpeed)
loads inside `main`.
"""

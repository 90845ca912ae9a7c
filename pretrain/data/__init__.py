"""Training data: the packed, rank-partitioned, resumable token stream and manifest checks.

    from rrwkv.pretrain.data import TokenStream, load_manifest, check_tokenizer, prepare_builtin_corpus
"""
from rrwkv.data_tools.builtin import BuiltinCorpus, prepare_builtin_corpus
from rrwkv.data_tools.errors import DataError
from rrwkv.data_tools.manifest import Manifest, check_tokenizer, load_manifest

from .stream import TokenStream

__all__ = ["TokenStream", "Manifest", "load_manifest", "check_tokenizer", "DataError",
           "prepare_builtin_corpus", "BuiltinCorpus"]

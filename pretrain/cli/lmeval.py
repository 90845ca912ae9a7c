"""`rrwkv-lm-eval`: lm_eval's own command line, with the `lm_eval.models` entry points registered first.

    rrwkv-lm-eval --model rrwkv --model_args pretrained=MODEL_DIR --tasks hellaswag --batch_size 32
    torchrun --nproc_per_node 8 -m rrwkv.pretrain.cli.lmeval --model rrwkv --model_args pretrained=MODEL_DIR ...

lm_eval releases that read the `lm_eval.models` entry-point group themselves (after 0.4.13) find
`rrwkv` from plain `lm_eval --model rrwkv ...`; this command gives the same on the releases before.
Every argument is lm_eval's (`rrwkv-lm-eval --help`).
"""
import sys
from typing import Optional, Sequence

from rrwkv.pretrain.errors import UserError


def register_entry_point_models() -> None:
    """Register every `lm_eval.models` entry point of the installed packages as a lazy lm_eval model, as
    later lm_eval releases do themselves (built-in names win). A plugin's module is imported only when
    its model is asked for."""
    from importlib.metadata import entry_points

    import lm_eval.models  # noqa: F401  (the built-in models first)
    from lm_eval.api.registry import model_registry
    for ep in entry_points(group="lm_eval.models"):
        if ep.name not in model_registry:
            # As "module:attr", not the EntryPoint: lm_eval 0.4.13 lets a class's own @register_model
            # replace a placeholder string in place, but not an EntryPoint.
            model_registry.register(ep.name, target=ep.value)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("error: rrwkv-lm-eval needs lm-evaluation-harness: pip install -e '.[lm-eval]'", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    register_entry_point_models()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

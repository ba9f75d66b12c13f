"""``python -m longtrain.trainer RECIPE [key=value ...]``: one training process (torchrun runs one per rank)."""

import sys

from .cli import run_train


def _main() -> int:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m longtrain.trainer RECIPE [key=value ...]  (under torchrun for several ranks)")
        return 0 if argv else 2
    return run_train(argv[0], argv[1:])


sys.exit(_main())

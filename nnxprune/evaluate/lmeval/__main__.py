"""`python -m nnxprune.evaluate.lmeval ARGS`: lm-eval's own command line, `nnxprune` model included.

Running this module imports the `nnxprune.evaluate.lmeval` package first, which registers the
`nnxprune` model in lm-eval's model registry; then lm-eval's `cli_evaluate` takes the arguments.

Example:
    python -m nnxprune.evaluate.lmeval run --model nnxprune \
        --model_args model=smollm2-135m --tasks hellaswag --limit 100
"""

from __future__ import annotations

import sys
from typing import Sequence

import nnxprune.evaluate.lmeval  # noqa: F401  (registers the `nnxprune` model)


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's own command line with the `nnxprune` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()

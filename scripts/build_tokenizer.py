"""Build the bundled tokenizer: byte-level BPE, vocab 4096, trained on the bundled pydoc prose.

    python scripts/build_tokenizer.py            # (re)write trainer/data/assets/tokenizer.json
    python scripts/build_tokenizer.py --check    # exit 1 if the committed file is out of date

Training is deterministic and takes well under a second. The corpus is the running Python's
``pydoc_data.topics``, so rebuild with the same Python minor version to reproduce the file exactly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longtrain.trainer.data.bundled import corpus_documents
from longtrain.trainer.data.tokenizer import BUNDLED_TOKENIZER_PATH, train_bundled_tokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file, write nothing")
    parser.add_argument(
        "--out", type=Path, default=BUNDLED_TOKENIZER_PATH, help="where to write tokenizer.json"
    )
    args = parser.parse_args()

    text = train_bundled_tokenizer(corpus_documents()).to_str(pretty=True) + "\n"
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else None
        if current != text:
            print(f"{args.out} is out of date; run python scripts/build_tokenizer.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date (Python {sys.version_info.major}.{sys.version_info.minor})")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""alpha="auto" resolved once per job and length: ``AlphaRecord`` keeps the alphas in a JSON file.

alpha="auto" is measured (a layer's timings, the tier's copy bandwidth), so two processes measure
different values; and the executor cuts a layer's row tiles at the offloaded head's end row, so
the forward's floats depend on the alpha measured. A resumed run that measured afresh would then
not continue the first run's floats. The trainer gives each rank a file under its output_dir:
the first process to resolve a length writes the alphas there (to a temporary name, then an
atomic rename), and every later process of the same job (a resume, a re-run of the command) reads
them back instead of measuring. The file says what it was measured for (the activation plan, the
device, the layer's shapes and dtype); a file measured for anything else is measured over.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

Alphas = list[float | str]


class AlphaRecord:
    """The alphas of every length resolved so far for the job described by ``key`` (JSON values),
    kept at ``path``."""

    def __init__(self, path: str | Path, key: dict[str, Any]):
        self.path = Path(path)
        self.key = json.loads(json.dumps(key))  # as it reads back
        self.by_length: dict[int, Alphas] = {}
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # none yet, or unreadable: measured afresh and written over
        if isinstance(saved, dict) and saved.get("for") == self.key and isinstance(saved.get("alphas"), dict):
            self.by_length = {int(t): list(a) for t, a in saved["alphas"].items()}

    def get(self, t: int) -> Alphas | None:
        """The alphas recorded for ``t`` rows, or None."""
        return self.by_length.get(t)

    def put(self, t: int, alphas: Alphas) -> None:
        """Record the alphas of ``t`` rows and write the file (whole, atomically)."""
        self.by_length[t] = list(alphas)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        record = {"for": self.key, "alphas": {str(n): a for n, a in sorted(self.by_length.items())}}
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, self.path)

"""Materialize the demo corpus from what is installed: the Python Language Reference topics that
CPython ships in ``pydoc_data``. Real text no one on this project wrote, never committed."""

from __future__ import annotations

import re
import sys
from pathlib import Path


def materialize(dest: Path, only: list[str] | None = None) -> int:
    """Write each topic as ``<topic>.txt``; ``only`` picks a subset (the end-to-end tests use one)."""
    from pydoc_data.topics import topics

    dest.mkdir(parents=True, exist_ok=True)
    chosen = {k: v for k, v in topics.items() if only is None or k in only}
    for name, text in sorted(chosen.items()):
        safe = re.sub(r"[^a-z0-9_-]+", "-", name.lower())
        (dest / f"{safe}.txt").write_text(text.strip() + "\n", encoding="utf-8")
    (dest / "SOURCE").write_text(f"CPython {sys.version.split()[0]} pydoc_data.topics; generated, not committed\n")
    return len(chosen)


if __name__ == "__main__":
    n = materialize(Path(sys.argv[1] if len(sys.argv) > 1 else "datasets/pyref"))
    print(f"materialized {n} topics")

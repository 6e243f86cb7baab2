"""The one reader of JSON-lines files (data files, ``metrics.jsonl``): each caller checks its own fields."""

from __future__ import annotations

import json
from pathlib import Path


def json_lines(path: str | Path, text: str | None = None) -> list[tuple[int, object]]:
    """``(line number, value)`` for every non-blank line of ``path`` (or of ``text``, read from it).

    A line that is not JSON raises ``ValueError`` naming the file and the line (1-based)."""
    if text is None:
        text = Path(path).read_text(encoding="utf-8-sig")
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
    return records

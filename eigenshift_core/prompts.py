"""Prompt sources: CSV, JSONL or TXT files (column/key `prompt`, or one prompt per line), and row ranges.

Rows are half-open `A:B` ranges over the file's data rows (0-based), so the rows that build an
intervention and the rows that evaluate it can be stated, checked disjoint and recorded.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from eigenshift_core.errors import InputError

SUFFIXES = (".csv", ".jsonl", ".txt")


@dataclass(frozen=True)
class PromptSet:
    """Prompts taken from `source`, rows [start, stop) of it; `records` keeps every column of each row."""

    source: str
    start: int
    stop: int
    records: list[dict[str, str]]

    @property
    def texts(self) -> list[str]:
        return [r["prompt"] for r in self.records]

    @property
    def rows(self) -> str:
        return f"{self.start}:{self.stop}"

    def describe(self) -> dict[str, object]:
        return {"source": self.source, "rows": self.rows, "count": len(self.records)}


def parse_rows(spec: str | None, total: int, *, field: str = "rows") -> tuple[int, int]:
    """`A:B` (either side may be empty) -> (start, stop) within [0, total]; refuses reversed or out-of-range."""
    if spec is None or spec == "":
        return 0, total
    parts = spec.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start = int(parts[0]) if parts[0].strip() else 0
        stop = int(parts[1]) if parts[1].strip() else total
    except ValueError:
        raise InputError(f"rows must look like A:B (e.g. 0:4000), got {spec!r}", field=field) from None
    if start < 0 or stop < 0:
        raise InputError(f"rows must not be negative, got {spec!r}", field=field)
    if start >= stop:
        raise InputError(f"rows {spec!r} select nothing (start must be below stop)", field=field)
    if stop > total:
        raise InputError(f"rows {spec!r} go past the end: the source has {total} rows", field=field)
    return start, stop


def read_records(path: Path) -> list[dict[str, str]]:
    """Every data row of a prompt file as a dict with at least `prompt`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file not found: {path}", field="prompts")
    if path.suffix not in SUFFIXES:
        raise InputError(f"prompt file must be one of {', '.join(SUFFIXES)}, got {path.name}", field="prompts")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"prompt file is not UTF-8: {path}", field="prompts") from None
    if path.suffix == ".txt":
        return [{"prompt": line} for line in text.splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{path.name} line {number} is not JSON", field="prompts") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise InputError(f"{path.name} line {number} has no string `prompt`", field="prompts")
            records.append({k: v if isinstance(v, str) else json.dumps(v) for k, v in item.items()})
        return records
    reader = csv.DictReader(text.splitlines(keepends=True))
    if "prompt" not in (reader.fieldnames or []):
        raise InputError(f"{path.name} has no `prompt` column (columns: {reader.fieldnames})", field="prompts")
    return [dict(row) for row in reader]


def load_prompts(path: Path, rows: str | None = None) -> PromptSet:
    """Prompts of rows `A:B` of a CSV/JSONL/TXT file; refuses an empty selection and empty prompts."""
    records = read_records(path)
    if not records:
        raise InputError(f"prompt file {path} holds no prompts", field="prompts")
    start, stop = parse_rows(rows, len(records))
    chosen = records[start:stop]
    blank = [start + i for i, r in enumerate(chosen) if not (r.get("prompt") or "").strip()]
    if blank:
        raise InputError(f"empty prompt in row {blank[0]} of {path}", field="prompts")
    return PromptSet(source=str(path), start=start, stop=stop, records=chosen)


def require_disjoint(train: PromptSet, evaluation: PromptSet) -> None:
    """Building and evaluating on the same rows of the same source inflates every figure: refuse it."""
    if train.source == evaluation.source and train.start < evaluation.stop and evaluation.start < train.stop:
        raise InputError(
            f"train rows {train.rows} and eval rows {evaluation.rows} overlap: evaluate on held-out prompts",
            field="eval_rows",
        )

"""Shared helpers of the benchmark scripts: timing, environment, tables and JSON output."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import jax

from chaosjax._util import environment_info


def block(x):
    return jax.block_until_ready(x)


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls (the result is blocked on)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        block(fn())
        best = min(best, time.perf_counter() - t)
    return best


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("—" if v is None else format(v, fmt))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def write_json(path: str | Path, name: str, rows: list[dict], extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "environment": environment_info(), "rows": rows, **(extra or {})}
    path.write_text(json.dumps(payload, indent=2, default=float))
    return path

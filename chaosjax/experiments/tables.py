"""The one markdown-table helper of the summaries: a header with its separator sized from the
columns (never counted by hand), and rows checked against the header's width."""

from __future__ import annotations

from collections.abc import Sequence


def table_head(*columns: str) -> list[str]:
    """The header line and the separator of a table with these columns."""
    if not columns:
        raise ValueError("columns: a table needs at least one column")
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def table_row(*cells, width: int | None = None) -> str:
    """One row; ``width`` (the header's column count) is checked when given."""
    if width is not None and len(cells) != width:
        raise ValueError(f"cells: the table has {width} columns, got {len(cells)}")
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(columns: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """Header, separator and rows of a whole table."""
    return [*table_head(*columns), *(table_row(*r, width=len(columns)) for r in rows)]


__all__ = ["table", "table_head", "table_row"]

"""A small generic markdown renderer: numbers, tables, records as tables, and templates.

A template file is a series of blocks, each opened by a line `<!-- name -->` (text before the
first is a note to its editors). A block is markdown with str.format fields, `{name}` or
`{name:,.1f}`; `fill` leaves out every line that names a field whose value is None (and the
blank line after it when it stood alone as a paragraph), so optional sentences live in the
template too. Stdlib only.
"""
from __future__ import annotations

import re
import string
from typing import Callable, Iterable, Sequence


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def table(header: list[str], rows: list[list]) -> list[str]:
    """Markdown table lines, then a blank line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def cell(item, column: str | Callable):
    """A function of the item, or its field: an attribute, else a key of its config."""
    if callable(column):
        return column(item)
    return getattr(item, column) if hasattr(item, column) else item.config[column]


def records_table(items: Iterable, columns: Sequence[tuple[str, str | Callable]],
                  unique: Sequence[str] = ()) -> list[str]:
    """One row per item, one column per (header, field or function); with `unique` fields,
    only the first item of each combination of their values."""
    rows, seen = [], set()
    for item in items:
        key = tuple(cell(item, f) for f in unique)
        if unique and key in seen:
            continue
        seen.add(key)
        rows.append([cell(item, c) for _, c in columns])
    return table([h for h, _ in columns], rows)


def blocks(text: str) -> dict[str, str]:
    """The named blocks of a template, without the blank lines around them."""
    parts = re.split(r"(?m)^<!-- (\S+) -->\n", text)
    return {name: body.strip("\n") for name, body in zip(parts[1::2], parts[2::2])}


def fill(block: str, **values) -> str:
    """The block with its fields filled; a list value is lines (a table), joined."""
    values = {k: "\n".join(v).strip("\n") if isinstance(v, list) else v for k, v in values.items()}
    lines, out, drop_blank = block.split("\n"), [], False
    for i, line in enumerate(lines):
        if drop_blank and not line:
            drop_blank = False
            continue
        drop_blank = False
        fields = [f for _, f, _, _ in string.Formatter().parse(line) if f]
        if any(values[re.split(r"[.\[]", f)[0]] is None for f in fields):
            drop_blank = i == 0 or not lines[i - 1]  # a paragraph on its own: its blank line goes too
            continue
        out.append(line.format_map(values))
    return "\n".join(out).strip("\n")

"""GitHub-flavoured Markdown tables, formatted like the HTML report."""

from __future__ import annotations

from typing import Any

from lit_cf.report.formatting import as_number, cell, columns_of, format_value, is_missing


def _escape(text: str) -> str:
    # A pipe would end the cell, a newline the row; backslashes first so the escapes survive.
    return " ".join(text.replace("\\", "\\\\").replace("|", "\\|").split())


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """``rows`` as a GitHub-flavoured Markdown table (columns: union of keys, first-seen order).

    Floats have 4 significant digits, None/NaN and absent keys are shown as an en dash, and
    columns whose present values are all numbers are right-aligned. Returns "" for no rows.
    """
    if not rows:
        return ""
    columns = columns_of(rows)
    numeric = [
        all(as_number(cell(r, c)) is not None or is_missing(cell(r, c)) for r in rows)
        and any(as_number(cell(r, c)) is not None for r in rows)
        for c in columns
    ]
    lines = [
        "| " + " | ".join(_escape(c) or " " for c in columns) + " |",
        "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_escape(format_value(cell(row, c))) for c in columns) + " |")
    return "\n".join(lines) + "\n"

"""Markdown tables for the benchmark reports: one spelling of a row and of a header."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table_header(columns: Sequence[str]) -> list[str]:
    """The header row and the separator under it."""
    return [table_row(columns), "|" + "---|" * len(columns)]

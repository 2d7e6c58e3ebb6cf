"""Result rows and the paper-style tables (DESIGN.md, "Contracts").

- :mod:`~ssl_colorize.results.rows`: one row per measured number; :func:`append_rows` (one file per
  call, safe for concurrent jobs on any filesystem), :func:`read_rows`, :func:`make_row`.
- :mod:`~ssl_colorize.results.tables`: ours beside the published numbers (``published.csv``, package data).
- :mod:`~ssl_colorize.results.plots`: accuracy against layer.
- ``python -m ssl_colorize.results``: the tables CLI (:mod:`ssl_colorize.results.__main__`).
"""

from ssl_colorize.results.plots import plot_accuracy_vs_layer
from ssl_colorize.results.rows import (COLUMNS, HEADER, PARTS_SUFFIX, ResultRow, append_rows, code_version,
                                       find_tables, has_rows, make_row, parts_dir, read_rows, table_files)
from ssl_colorize.results.tables import (PUBLISHED_COLUMNS, PUBLISHED_CSV, TABLE_INFO_COLUMNS, TAP_ORDER,
                                         format_table, load_published, our_method_label, paper_table,
                                         paper_tables, select_rows, value_columns)


def cli(argv: list[str] | None = None) -> int:
    """The tables CLI (``python -m ssl_colorize.results``, ``ssl-colorize-results``)."""
    # Imported here: importing __main__ with the package would make ``python -m`` run it twice.
    from ssl_colorize.results.__main__ import cli as _cli

    return _cli(argv)


__all__ = [
    "COLUMNS", "HEADER", "PARTS_SUFFIX", "PUBLISHED_COLUMNS", "PUBLISHED_CSV", "ResultRow", "TABLE_INFO_COLUMNS",
    "TAP_ORDER", "append_rows", "cli", "code_version", "find_tables", "format_table", "has_rows",
    "load_published", "make_row", "our_method_label", "paper_table", "paper_tables", "parts_dir",
    "plot_accuracy_vs_layer", "read_rows", "select_rows", "table_files", "value_columns",
]

"""Result rows and the paper-style tables (DESIGN.md, "Contracts").

- :mod:`~ssl_colorize.results.rows`: one row per measured number; :func:`append_rows` (one file per
  call, safe for concurrent jobs on any filesystem), :func:`read_rows`, :func:`make_row`.
- :mod:`~ssl_colorize.results.tables`: ours beside the published numbers of the same protocol
  (``published.csv``, package data; sources in docs/published-numbers.md).
- :mod:`~ssl_colorize.results.plots`: accuracy against layer.
- ``python -m ssl_colorize.results``: the tables CLI (:mod:`ssl_colorize.results.__main__`).
"""

from ssl_colorize.results.plots import plot_accuracy_vs_layer
from ssl_colorize.results.rows import (COLUMNS, HEADER, LEGACY_PROTOCOLS, PARTS_SUFFIX, PROBE_PROTOCOLS, ResultRow,
                                       append_rows, canonical_protocol, code_version, find_tables, has_rows,
                                       make_row, parts_dir, read_rows, table_files, with_canonical_protocols)
from ssl_colorize.results.tables import (PUBLISHED_COLUMNS, PUBLISHED_CSV, TABLE_INFO_COLUMNS, TAP_ORDER,
                                         format_table, load_published, our_method_label, paper_table,
                                         paper_tables, published_problems, row_label, select_rows, value_columns)


def cli(argv: list[str] | None = None) -> int:
    """The tables CLI (``python -m ssl_colorize.results``, ``ssl-colorize-results``)."""
    # Imported here: importing __main__ with the package would make ``python -m`` run it twice.
    from ssl_colorize.results.__main__ import cli as _cli

    return _cli(argv)


__all__ = [
    "COLUMNS", "HEADER", "LEGACY_PROTOCOLS", "PARTS_SUFFIX", "PROBE_PROTOCOLS", "PUBLISHED_COLUMNS", "PUBLISHED_CSV",
    "ResultRow", "TABLE_INFO_COLUMNS", "TAP_ORDER", "append_rows", "canonical_protocol", "cli", "code_version",
    "find_tables", "format_table", "has_rows", "load_published", "make_row", "our_method_label", "paper_table",
    "paper_tables", "parts_dir", "plot_accuracy_vs_layer", "published_problems", "read_rows", "row_label",
    "select_rows", "table_files", "value_columns", "with_canonical_protocols",
]

"""Frozen-layer linear probes: ``python benchmarks/linear_probe.py ...`` is
``python -m ssl_colorize.benchmarks.linear_probe ...`` (the recipe and its options live there)."""

from ssl_colorize.benchmarks.linear_probe import cli

if __name__ == "__main__":
    cli()

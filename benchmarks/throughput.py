"""Throughput benchmark: ``python benchmarks/throughput.py ...`` = ``python -m ssl_colorize.benchmarks.throughput ...``."""

from ssl_colorize.benchmarks.throughput import cli

if __name__ == "__main__":
    cli()

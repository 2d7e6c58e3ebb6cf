"""Colorization quality (paper Table 1): ``python benchmarks/colorization_quality.py ...`` =
``python -m ssl_colorize.benchmarks.colorization_quality ...``."""

from ssl_colorize.benchmarks.colorization_quality import cli

if __name__ == "__main__":
    cli()

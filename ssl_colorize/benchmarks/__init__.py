"""The benchmarks as modules: ``python -m ssl_colorize.benchmarks.NAME`` (``benchmarks/NAME.py`` launches the same)."""

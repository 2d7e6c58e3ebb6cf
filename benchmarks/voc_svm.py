"""VOC2007 per-layer linear SVMs: ``python benchmarks/voc_svm.py ...`` = ``python -m ssl_colorize.benchmarks.voc_svm ...``."""

from ssl_colorize.benchmarks.voc_svm import cli

if __name__ == "__main__":
    cli()

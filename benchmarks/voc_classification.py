"""VOC2007 classification by fine-tuning: ``python benchmarks/voc_classification.py --help``.

The recipe is ssl_colorize/benchmarks/voc_classification.py (also ``python -m ssl_colorize.benchmarks.voc_classification``).
"""

from ssl_colorize.benchmarks.voc_classification import cli

if __name__ == "__main__":
    cli()

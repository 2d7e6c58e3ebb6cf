"""VOC2007 detection (Faster R-CNN on the encoder): ``python benchmarks/voc_detection.py --help``.

The recipe is ssl_colorize/benchmarks/voc_detection.py (also ``python -m ssl_colorize.benchmarks.voc_detection``).
"""

from ssl_colorize.benchmarks.voc_detection import cli

if __name__ == "__main__":
    cli()

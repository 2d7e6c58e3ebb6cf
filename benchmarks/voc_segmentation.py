"""VOC semantic segmentation (FCN-32s on the encoder): ``python benchmarks/voc_segmentation.py --help``.

The recipe is ssl_colorize/benchmarks/voc_segmentation.py (also ``python -m ssl_colorize.benchmarks.voc_segmentation``).
"""

from ssl_colorize.benchmarks.voc_segmentation import cli

if __name__ == "__main__":
    cli()

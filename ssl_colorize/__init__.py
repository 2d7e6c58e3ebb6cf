"""ssl_colorize: colorization as a self-supervised pretext task (Zhang, Isola, Efros, ECCV 2016)."""

__version__ = "0.1.0"

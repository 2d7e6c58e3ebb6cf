"""The parts of the colorization pretext trainer (``python -m ssl_colorize.pretrain`` reads as the recipe)."""

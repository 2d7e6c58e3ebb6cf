"""ssl_colorize: colorization as a self-supervised pretext task (Zhang, Isola, Efros, ECCV 2016)."""


def _version() -> str:
    """The version setuptools-scm gave this build: ``_version.py`` is written beside the code at build
    or (editable) install time; the installed metadata is the fallback."""
    try:
        from ssl_colorize._version import version

        return version
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("ssl_colorize")
        except PackageNotFoundError:  # run from a source tree that was never installed
            return "0+unknown"


__version__ = _version()

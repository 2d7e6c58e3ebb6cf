"""MATLAB files of the VOC add-ons (SBD's class masks, the released selective-search proposals): one
reader that turns every way a file can fail to be a readable ``.mat`` into a ValueError naming it."""

from __future__ import annotations

import os


def load_mat(path: str | os.PathLike, **loadmat_kwargs) -> dict:
    """``scipy.io.loadmat(path, **loadmat_kwargs)``; ValueError naming ``path`` for a missing, empty or
    non-MATLAB file, and for a MATLAB v7.3 file (an HDF5 container, which scipy does not read: the
    version is checked first, from the file's 128-byte header)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError, matfile_version

    try:
        major, _ = matfile_version(str(path))
    except (MatReadError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a MATLAB file ({exc})") from None
    if major == 2:
        raise ValueError(f"{path}: a MATLAB v7.3 (HDF5) file, which scipy cannot read; "
                         "save it again with save(..., '-v7')")
    try:
        return loadmat(str(path), **loadmat_kwargs)
    except (MatReadError, ValueError, OSError, TypeError) as exc:  # a header that promises more than the file holds
        raise ValueError(f"{path}: not a readable MATLAB file ({exc})") from None

"""Data on disk: image folders and list files, the built-in default, transforms."""

from ssl_colorize.data.builtin import (
    SHAPE_CLASSES,
    builtin_photos,
    builtin_pretrain_list,
    cache_dir,
    ensure_builtin_imagefolder,
    ensure_builtin_photos,
)
from ssl_colorize.data.images import Batch, ImageFiles, collate_skipping, find_images, read_image
from ssl_colorize.data.transforms import EvalTransform, TrainTransform, center_crop, random_crop_flip, resize_shorter

__all__ = [
    "SHAPE_CLASSES", "builtin_photos", "builtin_pretrain_list", "cache_dir", "ensure_builtin_imagefolder",
    "ensure_builtin_photos", "Batch", "ImageFiles", "collate_skipping", "find_images", "read_image",
    "EvalTransform", "TrainTransform", "center_crop", "random_crop_flip", "resize_shorter",
]

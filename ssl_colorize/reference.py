"""The released code's way of preparing targets and computing the loss, kept as ground truth.

The released Caffe code ran its Python layers (NNEncLayer, PriorBoostLayer, NonGrayMaskLayer) on the CPU
in float64 NumPy: scikit-learn's ``NearestNeighbors(10, ball_tree)`` over the 313 ab centres, a dense
(pixels x 313) soft target, the prior boost read from the target's argmax, and a dense cross-entropy
(docs/protocols.md section 2). Its data layer decoded each JPEG with PIL and converted it to Lab with
scikit-image, one image after another, in the training process.

Nothing in training uses this module: ``tests/test_fast_path.py`` checks our fast paths against it,
and the throughput benchmark (:mod:`ssl_colorize.benchmarks.throughput`) times it as the baseline.
"""

from __future__ import annotations

import numpy as np
import torch

from ssl_colorize.targets import DEFAULT_K, DEFAULT_LAMBDA, DEFAULT_SIGMA, NUM_BINS

#: |a| or |b| above this (ab units) somewhere in the image: a colour image (the released NonGrayMaskLayer).
GREY_THRESHOLD = 5.0


class ReferenceEncoder:
    """NNEncLayer / PriorBoostLayer / NonGrayMaskLayer as they ran: CPU, float64, a ball tree, a dense target."""

    def __init__(self, k: int = DEFAULT_K, sigma: float = DEFAULT_SIGMA, lam: float = DEFAULT_LAMBDA):
        from sklearn.neighbors import NearestNeighbors

        from ssl_colorize.targets import bin_centers, load_prior, rebalance_weights

        self.k, self.sigma = k, sigma
        self.centers = bin_centers(dtype=torch.float64).numpy()
        self.nn = NearestNeighbors(n_neighbors=k, algorithm="ball_tree").fit(self.centers)
        self.class_weights = rebalance_weights(load_prior(dtype=torch.float64), lam).numpy()

    def encode_flat(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P, 2) ab -> (indices (P, k), Gaussian weights (P, k)), nearest first."""
        dist, idx = self.nn.kneighbors(np.asarray(points, dtype=np.float64))
        weights = np.exp(-(dist**2) / (2 * self.sigma**2))
        return idx, weights / weights.sum(axis=1, keepdims=True)

    def encode_dense(self, ab: np.ndarray) -> np.ndarray:
        """ab (N, 2, H, W) -> dense soft target (N, 313, H, W) float32 (the Caffe blob the layer wrote)."""
        n, _, h, w = ab.shape
        flat = ab.transpose(0, 2, 3, 1).reshape(-1, 2)
        idx, weights = self.encode_flat(flat)
        dense = np.zeros((flat.shape[0], NUM_BINS))  # float64, as np.zeros gives
        dense[np.arange(flat.shape[0])[:, None], idx] = weights
        blob = np.empty((n, NUM_BINS, h, w), dtype=np.float32)
        blob[...] = dense.reshape(n, h, w, NUM_BINS).transpose(0, 3, 1, 2)
        return blob

    def prior_boost(self, dense: np.ndarray) -> np.ndarray:
        """Per-pixel rebalancing weight from the argmax of the dense target: (N, H, W)."""
        return self.class_weights[np.argmax(dense, axis=1)].astype(np.float32)

    @staticmethod
    def non_grey(ab: np.ndarray, threshold: float = GREY_THRESHOLD) -> np.ndarray:
        """(N,) 1.0 for an image with any |a| or |b| above the threshold, else 0.0."""
        return (np.abs(ab) > threshold).reshape(ab.shape[0], -1).any(axis=1).astype(np.float32)


def dense_cross_entropy(logits: torch.Tensor, target: torch.Tensor, pixel_weights: torch.Tensor) -> torch.Tensor:
    """The textbook loss on a dense target: mean over pixels of -w_p sum_q Z_pq log softmax(x_p)_q."""
    log_probs = torch.log_softmax(logits.float(), dim=1)
    return -(pixel_weights * (target * log_probs).sum(1)).mean()


def reference_loss(logits: torch.Tensor, ab: torch.Tensor, encoder: ReferenceEncoder) -> torch.Tensor:
    """Soft encoding + rebalanced loss the reference way: ab goes to the CPU, the dense target comes back."""
    ab_np = ab.detach().cpu().numpy()
    dense = encoder.encode_dense(ab_np)
    weights = encoder.prior_boost(dense) * encoder.non_grey(ab_np)[:, None, None]
    target = torch.from_numpy(dense).to(logits.device)
    return dense_cross_entropy(logits, target, torch.from_numpy(weights).to(logits.device))


def crop_window(height: int, width: int, crop: int, seed: int) -> tuple[int, int, bool]:
    """(top, left, mirror) of a sample: the draws of ``random_crop_flip`` with the sample's generator,
    so the reference path cuts exactly the windows our path cuts."""
    g = torch.Generator().manual_seed(int(seed) % 2**63)
    top = int(torch.randint(0, height - crop + 1, (1,), generator=g))
    left = int(torch.randint(0, width - crop + 1, (1,), generator=g))
    return top, left, bool(torch.rand(1, generator=g) < 0.5)


class ReferenceData:
    """JPEG -> (L, dense target, pixel weights) the reference way: PIL decode and resize, the same crop
    window, scikit-image ``rgb2lab`` per image (float64), the loss grid by decimation, and the
    :class:`ReferenceEncoder` targets; all in the training process, one image after another."""

    def __init__(self, paths: list, crop: int, resize: int | None, grid_stride: int, encoder: ReferenceEncoder):
        self.paths, self.crop, self.resize, self.grid_stride, self.encoder = paths, crop, resize, grid_stride, encoder

    def image(self, path, seed: int) -> np.ndarray:
        """One crop, (crop, crop, 3) uint8."""
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            short = min(im.size)
            size = max(self.resize or short, self.crop)
            if short != size:  # the same output size as ssl_colorize.data.transforms.resize_shorter
                scale = size / short
                w, h = im.size
                im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            array = np.asarray(im)
        top, left, mirror = crop_window(array.shape[0], array.shape[1], self.crop, seed)
        array = array[top : top + self.crop, left : left + self.crop]
        return array[:, ::-1] if mirror else array

    def batch(self, items, device: torch.device | str = "cpu"):
        """``items``: (file index, sample seed) pairs -> (L (N, 1, crop, crop), dense target, pixel weights)."""
        from skimage.color import rgb2lab

        labs = [rgb2lab(self.image(self.paths[index], seed)) for index, seed in items]
        lab = np.stack(labs).transpose(0, 3, 1, 2)  # (N, 3, H, W) float64
        L = torch.from_numpy(np.ascontiguousarray(lab[:, :1], dtype=np.float32))
        ab = lab[:, 1:, :: self.grid_stride, :: self.grid_stride]
        dense = self.encoder.encode_dense(ab)
        weights = self.encoder.prior_boost(dense) * self.encoder.non_grey(ab)[:, None, None]
        return L.to(device), torch.from_numpy(dense).to(device), torch.from_numpy(weights).to(device)

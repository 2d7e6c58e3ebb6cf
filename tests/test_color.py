"""ssl_colorize.color against scikit-image's rgb2lab / lab2rgb (the released code's conversion)."""

import itertools

import numpy as np
import pytest
import torch
from skimage.color import lab2rgb, rgb2lab

from ssl_colorize.color import lab_to_rgb, rgb_to_lab, rgb_to_lightness


def _as_image(rgb_rows: np.ndarray) -> torch.Tensor:
    """(P, 3) colours -> a (1, 3, 1, P) tensor."""
    return torch.from_numpy(rgb_rows.T[None, :, None, :].copy())


def test_rgb_to_lab_matches_skimage_on_a_million_colours():
    rng = np.random.default_rng(0)
    colours = rng.random((1_000_000, 3))
    ours = rgb_to_lab(_as_image(colours).float())[0, :, 0, :].T.double().numpy()
    reference = rgb2lab(colours[None])[0]
    assert np.abs(ours - reference).max() < 1e-3


def test_lightness_alone_is_skimages_L_channel():
    rng = np.random.default_rng(3)
    colours = np.concatenate([rng.random((200_000, 3)), rng.random((1000, 3)) * 0.02])  # the linear toe too
    L = rgb_to_lightness(_as_image(colours).float())
    assert L.shape == (1, 1, 1, colours.shape[0])
    assert np.abs(L[0, 0, 0].double().numpy() - rgb2lab(colours[None])[0][:, 0]).max() < 1e-3
    batch = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose(rgb_to_lightness(batch), rgb_to_lab(batch)[:, :1], atol=1e-10)
    with pytest.raises(ValueError, match="rgb_to_lightness"):
        rgb_to_lightness(batch * 2)


def test_rgb_cube_corners_and_round_trip():
    corners = np.array(list(itertools.product([0.0, 1.0], repeat=3)))
    lab = rgb_to_lab(_as_image(corners))
    assert np.abs(lab[0, :, 0, :].T.numpy() - rgb2lab(corners[None])[0]).max() < 1e-3
    back = lab_to_rgb(lab)
    assert torch.allclose(back, _as_image(corners), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lab_to_rgb_matches_skimage_and_round_trips(dtype):
    rng = np.random.default_rng(1)
    colours = rng.random((200_000, 3))
    lab = rgb_to_lab(_as_image(colours).to(dtype))
    assert lab.dtype == dtype
    back = lab_to_rgb(lab)
    reference = lab2rgb(lab[0, :, 0, :].T.double().numpy()[None])[0]
    assert np.abs(back[0, :, 0, :].T.double().numpy() - reference).max() < 1e-3
    again = rgb_to_lab(back)
    assert (again - lab).abs().max() < 1e-3


def test_batched_shapes_and_gradients():
    x = torch.rand(2, 4, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    lab = rgb_to_lab(x)
    assert lab.shape == x.shape
    assert torch.autograd.gradcheck(lambda t: rgb_to_lab(t.clamp(0.05, 0.95)), (x[:1, :1, :, :2, :2].detach().requires_grad_(),))
    lab.sum().backward()
    assert torch.isfinite(x.grad).all()
    lab_in = torch.tensor([[[[50.0]], [[20.0]], [[-30.0]]]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: lab_to_rgb(t, clip=False), (lab_in,))


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(3, 4), "shape"),
        (torch.rand(1, 4, 4, 4), "shape"),
        (torch.full((1, 3, 2, 2), 1.5), "[0.0, 1.0]"),
        (torch.full((1, 3, 2, 2), -0.1), "index"),
        (torch.tensor([[[[float("nan")]], [[0.5]], [[0.5]]]]), "NaN"),
        (torch.zeros(1, 3, 2, 2, dtype=torch.uint8), "dtype"),
    ],
)
def test_bad_input_names_the_problem(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        rgb_to_lab(bad)

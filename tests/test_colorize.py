"""python -m ssl_colorize.colorize: full-resolution output that keeps the input's own L."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2lab

from ssl_colorize.checkpoint import save_checkpoint
from ssl_colorize.colorize import cli, get_args_parser, main
from ssl_colorize.models import create_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("colornet")
    with torch.no_grad():  # a head with strong opinions, so the output is far from grey
        model.head.weight.normal_(0, 0.5)
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"model": model.model_spec, "state_dict": model.state_dict()})
    return path


def test_output_keeps_size_and_l_channel(tmp_path, checkpoint):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # odd size: not a multiple of the stride
    grey = rng.integers(0, 256, (48, 40), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    written = main(get_args_parser().parse_args(
        [str(tmp_path / "colour.png"), str(tmp_path / "grey.png"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]))
    assert [p.name for p in written] == ["colour_colorized.png", "grey_colorized.png"]
    for source, result in zip((colour, np.stack([grey] * 3, -1)), written):
        out = np.asarray(Image.open(result).convert("RGB"))
        assert out.shape == source.shape
        L_in = rgb2lab(source / 255.0)[..., 0]
        lab_out = rgb2lab(out / 255.0)
        # Exactly, up to the 8-bit rounding of the output PNG (out-of-gamut colours lose chroma, not L).
        assert np.abs(lab_out[..., 0] - L_in).max() < 1.0
        assert np.median(np.abs(lab_out[..., 0] - L_in)) < 0.3
        assert np.abs(lab_out[..., 1:]).mean() > 1.0  # colours were added


def test_gamut_fit_keeps_l_and_only_shrinks_chroma():
    from ssl_colorize.color import fit_ab_to_gamut, lab_to_rgb

    L = torch.tensor([[[[2.0, 50.0, 98.0, 60.0]]]], dtype=torch.float64)
    ab = torch.tensor([[[[80.0, 20.0, -90.0, 0.0]], [[-100.0, 10.0, 90.0, 0.0]]]], dtype=torch.float64)
    fitted = fit_ab_to_gamut(L, ab)
    rgb = lab_to_rgb(torch.cat((L, fitted), 1), clip=False)
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5
    scale = fitted.norm(dim=1) / ab.norm(dim=1).clamp(min=1e-12)
    assert scale[0, 0, 0] < 0.5 and scale[0, 0, 2] < 0.5  # extreme L: most chroma must go
    assert torch.allclose(fitted[..., 1], ab[..., 1])  # (50, 20, 10) is in gamut: untouched
    cross = fitted[:, 0] * ab[:, 1] - fitted[:, 1] * ab[:, 0]
    assert torch.allclose(cross, torch.zeros_like(cross), atol=1e-9)  # the hue is kept: ab only scaled
    assert torch.all(fitted[..., 3] == 0)


def test_missing_image_and_bad_temperature_are_reported(tmp_path, checkpoint):
    cmd = [sys.executable, "-m", "ssl_colorize.colorize", str(tmp_path / "nope.jpg"), "--checkpoint", str(checkpoint)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "nope.jpg" in done.stderr
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    done = subprocess.run(cmd[:3] + [str(tmp_path / "a.png"), "--checkpoint", str(checkpoint), "--temperature", "0"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "--temperature" in done.stderr


def test_unreadable_file_is_skipped_not_fatal(tmp_path, checkpoint, capsys):
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    written = main(get_args_parser().parse_args(
        [str(tmp_path / "broken.jpg"), str(tmp_path / "ok.png"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]))
    assert [p.name for p in written] == ["ok_colorized.png"]
    assert "broken.jpg" in capsys.readouterr().err


def test_no_readable_input_exits_non_zero(tmp_path, checkpoint, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "notes.png").write_text("not an image either")
    with pytest.raises(SystemExit) as exit_info:
        cli([str(tmp_path / "broken.jpg"), str(tmp_path / "notes.png"), "--checkpoint", str(checkpoint),
             "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "notes.png" in err and "none of the 2 image(s)" in err
    assert not list((tmp_path / "o").iterdir())


def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_checkpoint_and_options_exit_2_with_one_line(tmp_path, checkpoint, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    image, out = str(tmp_path / "a.png"), ["--out", str(tmp_path / "o")]
    assert "--checkpoint" in _usage_error(capsys, [image, "--checkpoint", str(tmp_path / "none.pth"), *out])
    (tmp_path / "empty_run").mkdir()
    assert "checkpoint.pth" in _usage_error(capsys, [image, "--checkpoint", str(tmp_path / "empty_run"), *out])
    (tmp_path / "foreign.pth").write_bytes(b"not a checkpoint")
    assert "foreign.pth" in _usage_error(capsys, [image, "--checkpoint", str(tmp_path / "foreign.pth"), *out])
    for extra, needle in ((["--net-size", "0"], "--net-size 0"), (["--device", "tpu"], "--device tpu"),
                          (["--out", str(tmp_path / "a.png")], "--out")):
        assert needle in _usage_error(capsys, [image, "--checkpoint", str(checkpoint), *out, *extra])
    assert "--checkpoint" in _usage_error(capsys, [image])  # required
    assert not (tmp_path / "o").exists()


def test_a_run_folder_is_a_checkpoint(tmp_path, checkpoint):
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "ok.png")
    written = cli([str(tmp_path / "ok.png"), "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")])
    assert [p.name for p in written] == ["ok_colorized.png"]

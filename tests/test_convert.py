"""ssl_colorize.convert: released files in each format -> checkpoints that load_encoder rebuilds.

Each test writes its own fixture in the released format (random weights, released names and shapes;
tests/convert_testing.py), converts it through the CLI, rebuilds the model with load_encoder and
compares it with a forward pass written from the released layer list, to 1e-4. Nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch

from convert_testing import (
    assert_close, caffe_alexnet_layers, caffe_alexnet_reference, caffe_colornet_layers, caffe_colornet_reference,
    eccv16_reference, eccv16_state, vissl_alexnet_reference, vissl_alexnet_trunk, vissl_resnet_reference,
    vissl_resnet_trunk, write_caffe)
from ssl_colorize.checkpoint import load_checkpoint, load_encoder
from ssl_colorize.convert.__main__ import cli
from ssl_colorize.targets import bin_centers


def _lightness(size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 100.0


def _convert(fmt: str, src, out) -> None:
    assert cli(["--format", fmt, str(src), "--out", str(out)]) is None
    assert out.is_file()


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@torch.no_grad()
def test_eccv16_gives_the_ports_313_logits(tmp_path):
    state = eccv16_state()
    state["model_out.weight"] = bin_centers().T.reshape(2, 313, 1, 1) / 110.0  # the port's decoding matrix
    src, out = tmp_path / "colorization_release_v2.pth", tmp_path / "converted" / "colornet.pth"
    torch.save(state, src)
    _convert("eccv16", src, out)
    assert any("same bin order" in note for note in load_checkpoint(out)["config"]["notes"])
    model = load_encoder(out)
    assert model.model_spec["name"] == "colornet"
    lightness = _lightness(48)
    assert_close(model(lightness), eccv16_reference(state, lightness))
    assert load_checkpoint(out)["config"]["format"] == "eccv16"


@torch.no_grad()
def test_caffe_colornet_gives_conv8_313(tmp_path):
    layers = caffe_colornet_layers()
    src, out = tmp_path / "colorization_release_v2.caffemodel", tmp_path / "colornet.pth"
    write_caffe(src, layers)
    _convert("caffe", src, out)
    model = load_encoder(out)
    assert model.model_spec["name"] == "colornet"
    lightness = _lightness(48)
    assert_close(model(lightness), caffe_colornet_reference(layers, lightness))
    # the fixture's class8_ab is random, not the bin centres: the notes say so
    assert any(note.startswith("WARNING: class8_ab") for note in load_checkpoint(out)["config"]["notes"])


@pytest.mark.parametrize("with_bn", [False, True], ids=["released-nobn", "with-batchnorm"])
@torch.no_grad()
def test_caffe_alexnet_lab_gives_the_deploy_features(tmp_path, with_bn):
    layers = caffe_alexnet_layers(with_bn=with_bn)
    src, out = tmp_path / "alexnet_release_450000_nobn_fc_rs.caffemodel", tmp_path / "alexnet.pth"
    write_caffe(src, layers)
    _convert("caffe", src, out)
    model = load_encoder(out)
    assert model.model_spec["name"] == "alexnet_lab" and model.model_spec["kwargs"]["geometry"] == "transfer"
    lightness = _lightness(227)
    reference = caffe_alexnet_reference(layers, lightness)
    taps = model.forward_taps(lightness, list(reference))
    for name, expected in reference.items():
        assert_close(taps[name], expected)
    assert taps["fc7"].shape == (2, 4096, 1, 1)


@torch.no_grad()
def test_vissl_alexnet_gives_the_trunks_conv_features(tmp_path):
    trunk = vissl_alexnet_trunk()
    src, out = tmp_path / "converted_alexnet_colorization_in1k_pretext.torch", tmp_path / "alexnet.pth"
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": {}}}}}, src)
    _convert("vissl", src, out)
    model = load_encoder(out)
    assert model.model_spec["name"] == "alexnet_lab"
    lightness = _lightness(227)
    reference = vissl_alexnet_reference(trunk, lightness)
    taps = model.forward_taps(lightness, list(reference))
    for name, expected in reference.items():
        assert_close(taps[name], expected)


@torch.no_grad()
def test_vissl_resnet50_gives_the_trunks_features(tmp_path):
    trunk = vissl_resnet_trunk()
    src, out = tmp_path / "converted_vissl_rn50_colorization_in1k_goyal19.torch", tmp_path / "rn50.pth"
    torch.save({"model_state_dict": trunk}, src)  # the model-zoo layout (VISSL's STATE_DICT_KEY_NAME)
    _convert("vissl", src, out)
    model = load_encoder(out)
    assert model.model_spec["name"] == "resnet50_lab"
    lightness = _lightness(64)
    # res5 at stride 1 without dilation, as VISSL's LAYER4_STRIDE 1: every tap equals VISSL's trunk.
    reference = vissl_resnet_reference(trunk, lightness)
    taps = model.forward_taps(lightness, list(reference))
    for name, expected in reference.items():
        assert_close(taps[name], expected)


def test_wrong_shape_names_layer_and_shapes_and_writes_nothing(tmp_path, capsys):
    state = eccv16_state()
    state["model3.2.weight"] = state["model3.2.weight"][:, :128]
    src, out = tmp_path / "bad.pth", tmp_path / "out" / "colornet.pth"
    torch.save(state, src)
    err = _usage_error(capsys, ["--format", "eccv16", str(src), "--out", str(out)])
    assert "model3.2" in err and "(256, 128, 3, 3)" in err and "(256, 256, 3, 3)" in err
    assert not out.exists() and not out.parent.exists()


def test_caffe_missing_layer_and_wrong_shape(tmp_path, capsys):
    layers = caffe_colornet_layers()
    wrong = [(n, t, b, [blobs[0][:, :1], blobs[1]] if n == "conv2_1" else blobs) for n, t, b, blobs in layers]
    src, out = tmp_path / "wrong.caffemodel", tmp_path / "colornet.pth"
    write_caffe(src, wrong)
    err = _usage_error(capsys, ["--format", "caffe", str(src), "--out", str(out)])
    assert "conv2_1" in err and "(128, 1, 3, 3)" in err and "(128, 64, 3, 3)" in err
    write_caffe(src, [layer for layer in layers if layer[0] != "conv6_2"])
    err = _usage_error(capsys, ["--format", "caffe", str(src), "--out", str(out)])
    assert "conv6_2" in err
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["caffe", "eccv16", "vissl"])
def test_truncated_and_foreign_files(tmp_path, capsys, fmt):
    src = tmp_path / "model.bin"
    if fmt == "caffe":
        write_caffe(src, caffe_colornet_layers()[:6])
    else:
        torch.save(eccv16_state() if fmt == "eccv16" else {"model_state_dict": vissl_alexnet_trunk()}, src)
    out = tmp_path / "out.pth"
    payload = src.read_bytes()
    src.write_bytes(payload[: len(payload) // 2])
    err = _usage_error(capsys, ["--format", fmt, str(src), "--out", str(out)])
    assert str(src) in err
    src.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64)
    err = _usage_error(capsys, ["--format", fmt, str(src), "--out", str(out)])
    assert str(src) in err
    assert not out.exists()


def test_foreign_but_valid_files_are_refused(tmp_path, capsys):
    src, out = tmp_path / "other.pth", tmp_path / "out.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, src)
    assert "eccv16" in _usage_error(capsys, ["--format", "eccv16", str(src), "--out", str(out)])
    assert "VISSL" in _usage_error(capsys, ["--format", "vissl", str(src), "--out", str(out)])
    write_caffe(src, [("ip1", "InnerProduct", ["data"], [torch.zeros(3, 2).numpy(), torch.zeros(3).numpy()])])
    assert "ip1" in _usage_error(capsys, ["--format", "caffe", str(src), "--out", str(out)])
    assert not out.exists()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    src, out = tmp_path / "eccv16.pth", tmp_path / "colornet.pth"
    torch.save(eccv16_state(), src)
    out.write_bytes(b"keep me")
    err = _usage_error(capsys, ["--format", "eccv16", str(src), "--out", str(out)])
    assert "--overwrite" in err and out.read_bytes() == b"keep me"
    assert cli(["--format", "eccv16", str(src), "--out", str(out), "--overwrite"]) is None
    assert load_checkpoint(out)["model"]["name"] == "colornet"


def test_caffe_reader_understands_v1_layers_and_legacy_4d_blobs(tmp_path):
    # Older caffemodels list V1LayerParameter under NetParameter.layers (field 2) with an enum type
    # and blobs shaped by num / channels / height / width only.
    from ssl_colorize.convert.caffe_schema import NetParameter, read_caffemodel

    net = NetParameter(name="v1")
    layer = net.layers.add(name="conv1", type=4)
    layer.bottom.append("data")
    weight = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).numpy()
    blob = layer.blobs.add(num=2, channels=3, height=2, width=2)
    blob.data = weight.tobytes()
    bias = layer.blobs.add(num=1, channels=1, height=1, width=2)
    bias.data = torch.tensor([0.5, -1.0]).numpy().tobytes()
    src = tmp_path / "v1.caffemodel"
    src.write_bytes(net.SerializeToString())
    (read,) = read_caffemodel(src)
    assert (read.name, read.type, read.bottoms, read.legacy_shapes) == ("conv1", "Convolution", ["data"], True)
    assert read.blobs[0].shape == (2, 3, 2, 2) and float(read.blobs[0][1, 2, 1, 1]) == 23.0
    assert read.blobs[1].reshape(-1).tolist() == [0.5, -1.0]

"""VOC classification as released: dropout after fc6 / fc7 in training only, and the rescaling of a
pretrained checkpoint (on by default for one, off for ``random``), named in the rows."""

import functools
import json
from argparse import Namespace

import pytest
import torch
from torch import nn

from ssl_colorize.benchmarks import voc_classification as cls_bench
from ssl_colorize.checkpoint import save_checkpoint
from ssl_colorize.engine import rescale
from ssl_colorize.engine.cli import UsageError
from ssl_colorize.engine.transfer_run import resolve_rescale
from ssl_colorize.heads.classification import VOCClassifier
from ssl_colorize.models import create_model
from ssl_colorize.models.cards import get_card
from ssl_colorize.results import read_rows
from test_rescale import Tiny, images
from voc_testing import common, make_small_voc


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_small_voc(tmp_path_factory.mktemp("vocdata"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """An alexnet_lab checkpoint whose BatchNorm statistics are not the identity (as after pretraining)."""
    torch.manual_seed(0)
    model = create_model("alexnet_lab")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 4)
    path = tmp_path_factory.mktemp("ckpt") / "pretrained.pth"
    return save_checkpoint(path, {"model": model.model_spec, "state_dict": model.state_dict(), "step": 1})


def test_dropout_only_after_the_named_stages_and_only_in_training():
    torch.manual_seed(0)
    encoder, x = Tiny(), images("L", n=4)
    reference = encoder.forward_taps(x, ["fc6"])["fc6"]
    model = VOCClassifier(encoder, "fc6", dropout=0.5, dropout_after=("fc6",))
    model.train()
    encoder.eval()  # as the recipe's step: the classifier trains, the frozen encoder runs in eval mode
    first, second = model.features(x), model.features(x)
    assert not torch.equal(first, second)  # a new mask each forward
    active = reference > 0
    assert active.sum() > 40
    for features in (first, second):  # inverted dropout: every unit zeroed or doubled, nothing before fc6 moved
        kept = features != 0
        assert 0.25 < kept[active].float().mean() < 0.75 and not kept[~active].any()
        torch.testing.assert_close(features[kept], 2 * reference[kept])
    model.eval()
    torch.testing.assert_close(model.features(x), reference, rtol=0, atol=0)
    torch.testing.assert_close(model(x), model.fc8(reference.mean(dim=(2, 3))), rtol=0, atol=0)
    # dropout after conv2 changes what fc6 sees, not only fc6's output
    early = VOCClassifier(encoder, "fc6", dropout=0.5, dropout_after=("conv2",)).train()
    encoder.eval()
    assert ((early.features(x) != 0) & (early.features(x) != 2 * reference)).any()
    # p = 0 turns it off; a stage beyond the tap is refused
    off = VOCClassifier(encoder, "fc6", dropout=0.0, dropout_after=("fc6",)).train()
    encoder.eval()
    assert torch.equal(off.features(x), reference)
    with pytest.raises(ValueError, match="not a stage up to the tap"):
        VOCClassifier(encoder, "conv2", dropout=0.5, dropout_after=("fc6",))


def test_alexnet_lab_drops_after_fc6_and_fc7_as_released():
    assert get_card("alexnet_lab").transfer.dropout_after == ("fc6", "fc7")
    assert cls_bench.get_args_parser().parse_args([]).dropout == 0.5


def args_for(checkpoint, *extra):
    return cls_bench.get_args_parser().parse_args(["--checkpoint", str(checkpoint), *map(str, extra)])


def test_rescale_default_follows_the_checkpoint(pretrained):
    encoder = create_model("alexnet_lab", geometry="transfer")
    assert resolve_rescale(args_for("random"), encoder, "fc7") is False
    assert resolve_rescale(args_for(pretrained), encoder, "fc7") is True
    assert resolve_rescale(args_for(pretrained, "--no-rescale"), encoder, "fc7") is False
    assert resolve_rescale(args_for("random", "--rescale"), encoder, "fc7") is True
    assert resolve_rescale(args_for(pretrained, "--bn", "train"), encoder, "fc7") is False
    # an encoder that is not a feed-forward chain: off by default, refused when asked for
    residual_like = Tiny(bn="after_relu")
    assert resolve_rescale(Namespace(**{**vars(args_for(pretrained)), "rescale": None}),
                                     residual_like, "fc6") is False
    with pytest.raises(UsageError, match="--rescale is not defined"):
        resolve_rescale(args_for(pretrained, "--rescale"), residual_like, "fc6")


def test_pretrained_checkpoint_is_rescaled_and_rows_say_so(voc, pretrained, tmp_path, monkeypatch):
    # 2 of the 10 iterations keep the test short (the full loop is tested on a small net in test_rescale)
    monkeypatch.setattr(rescale, "rescale_encoder_", functools.partial(rescale.rescale_encoder_, iterations=2))
    args = cls_bench.get_args_parser().parse_args(common(
        voc, tmp_path, "--checkpoint", pretrained, "--finetune", "fc8", "--iters", 1, "--batch-size", 2,
        "--test-crops", 1, "--eval-batch-size", 6, "--rescale-batches", 2))
    summary = cls_bench.main(args)
    report = summary["rescale"]
    assert report["images"] == 4 and report["layers"] == [
        "data_l", "conv1.conv", "conv2.conv", "conv3.conv", "conv4.conv", "conv5.conv", "fc6.conv", "fc7.conv", "top"]
    assert len(report["absorbed_batchnorms"]) == 7 and report["iterations"] == 2
    assert all(f > 0 for f in report["weight_factors"].values())
    rows = read_rows(tmp_path / "voc.csv")
    hparams = [json.loads(h) for h in rows["hparams"]]
    assert all(h["rescale"] is True and h["dropout"] == 0.5 and h["dropout_after"] == ["fc6", "fc7"] for h in hparams)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "conv1.conv: weights x" in log and "fc7.conv: weights x" in log
    # resuming that run without the rescaling (BatchNorm modules back) is one clear line, nothing written
    checkpoint = (tmp_path / "run" / "checkpoint.pth").read_bytes()
    with pytest.raises(UsageError, match=r"--resume: .*does not fit this model.*--rescale"):
        cls_bench.main(cls_bench.get_args_parser().parse_args(common(
            voc, tmp_path, "--checkpoint", pretrained, "--finetune", "fc8", "--iters", 2, "--batch-size", 2,
            "--test-crops", 1, "--eval-batch-size", 6, "--no-rescale", "--resume")))
    assert (tmp_path / "run" / "checkpoint.pth").read_bytes() == checkpoint


@pytest.mark.parametrize("option,value,named", [("--rescale-batches", 0, "--rescale-batches 0"),
                                                 ("--dropout", 1, "--dropout 1"),
                                                 ("--dropout", -0.1, "--dropout -0.1")])
def test_bad_recipe_options_are_one_line(option, value, named, voc, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cls_bench.cli(common(voc, tmp_path, option, value))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "voc.csv").exists()


def test_rescale_with_batch_statistics_is_refused(voc, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cls_bench.cli(common(voc, tmp_path, "--rescale", "--bn", "train"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--rescale" in err and "--bn frozen" in err
    assert not (tmp_path / "run").exists()


def test_random_checkpoint_is_not_rescaled_and_rows_say_so(voc, tmp_path):
    summary = cls_bench.cli(common(voc, tmp_path, "--finetune", "fc8", "--iters", 1, "--batch-size", 2,
                                   "--test-crops", 1, "--eval-batch-size", 6))
    assert summary["rescale"] is None
    hparams = [json.loads(h) for h in read_rows(tmp_path / "voc.csv")["hparams"]]
    assert hparams and all(h["rescale"] is False for h in hparams)
    assert "rescale: off" in (tmp_path / "run" / "log.txt").read_text()

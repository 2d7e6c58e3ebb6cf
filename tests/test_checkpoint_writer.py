"""The trainer's background checkpoint writer: what lands is the state at the save, in step order, with its
snapshot copies; a failed write is raised, not lost; the trainer's files are the same either way."""

import collections
import threading

import pytest
import torch

from ssl_colorize.checkpoint import load_checkpoint
from ssl_colorize.pretrain import get_args_parser, main
from ssl_colorize.training import checkpoint_writer
from ssl_colorize.training.checkpoint_writer import CheckpointWriter, copy_file, host_copy


def state(value: float) -> dict:
    return {"model": {"name": "toy"}, "state_dict": {"w": torch.full((64, 64), value)},
            "optimizer": {"state": {0: {"exp_avg": torch.full((64,), value)}}, "param_groups": [{"lr": 0.1}]},
            "step": int(value)}


def test_host_copy_shares_no_tensor_or_container():
    Pair = collections.namedtuple("Pair", "a b")
    original = {"t": torch.arange(4.0), "list": [torch.ones(2), 3], "pair": Pair(torch.zeros(1), "x"), "n": 5}
    copied = host_copy(original)
    original["t"].add_(10)
    original["list"][0].mul_(7)
    original["list"].append("late")
    original["pair"].a.fill_(9)
    assert torch.equal(copied["t"], torch.arange(4.0))
    assert torch.equal(copied["list"][0], torch.ones(2)) and len(copied["list"]) == 2
    assert isinstance(copied["pair"], Pair) and copied["pair"].a.item() == 0 and copied["pair"].b == "x"
    assert copied["n"] == 5


def test_background_save_writes_the_state_as_it_was_at_the_save(tmp_path, monkeypatch):
    # The write is held until the caller has changed its tensors, as the next training steps do.
    release = threading.Event()
    real_save = checkpoint_writer.save_checkpoint

    def held_save(path, obj):
        assert release.wait(10)
        return real_save(path, obj)

    monkeypatch.setattr(checkpoint_writer, "save_checkpoint", held_save)
    live = state(1.0)
    writer = CheckpointWriter(background=True)
    writer.save(live, tmp_path / "checkpoint.pth", copies=[tmp_path / "snapshots" / "step_0000001.pth"])
    assert not (tmp_path / "checkpoint.pth").exists()  # returned before the write
    live["state_dict"]["w"].fill_(2.0)
    live["optimizer"]["state"][0]["exp_avg"].fill_(2.0)
    release.set()
    writer.close()
    for path in (tmp_path / "checkpoint.pth", tmp_path / "snapshots" / "step_0000001.pth"):
        saved = load_checkpoint(path)
        assert torch.equal(saved["state_dict"]["w"], torch.full((64, 64), 1.0))
        assert torch.equal(saved["optimizer"]["state"][0]["exp_avg"], torch.full((64,), 1.0))
    assert not list(tmp_path.rglob("*.tmp"))


def test_saves_land_in_order_and_a_snapshot_outlives_the_rolling_file(tmp_path):
    writer = CheckpointWriter(background=True)
    snapshot = tmp_path / "snapshots" / "step_0000002.pth"
    for value in (1.0, 2.0, 3.0):
        writer.save(state(value), tmp_path / "checkpoint.pth", copies=[snapshot] if value == 2.0 else [])
    writer.close()
    assert load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 3
    assert load_checkpoint(snapshot)["step"] == 2  # the later rolling writes replaced the name, not its data


def test_copy_file_without_hard_links_copies_the_bytes(tmp_path, monkeypatch):
    source = tmp_path / "a.bin"
    source.write_bytes(b"checkpoint bytes")

    def no_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(checkpoint_writer.os, "link", no_links)
    copy_file(source, tmp_path / "sub" / "b.bin")
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"checkpoint bytes"
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("background", [True, False])
def test_a_failed_write_is_raised_naming_the_file(tmp_path, background):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    writer = CheckpointWriter(background=background)
    target = blocker / "checkpoint.pth"  # its folder is a file: mkdir fails
    with pytest.raises(RuntimeError, match="writing checkpoint .*checkpoint.pth failed"):
        writer.save(state(1.0), target)
        writer.close()
    writer.close(raise_error=False)


def test_the_trainer_writes_the_same_checkpoints_in_the_background_as_blocking(tmp_path):
    common = ["--crop", "64", "--resize", "72", "--batch-size", "4", "--workers", "0", "--no-progress",
              "--steps", "4", "--ckpt-every", "2", "--snapshot-every", "2"]
    for mode in ("background", "blocking"):
        main(get_args_parser().parse_args([*common, "--out", str(tmp_path / mode), "--checkpoint-io", mode]))
    for name, step in (("checkpoint.pth", 4), ("snapshots/step_0000002.pth", 2), ("snapshots/step_0000004.pth", 4)):
        a, b = load_checkpoint(tmp_path / "background" / name), load_checkpoint(tmp_path / "blocking" / name)
        assert a["step"] == b["step"] == step
        for key in a["state_dict"]:
            assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert sorted(p.name for p in (tmp_path / "background").glob("preview_*.png")) == \
        ["preview_step0000002.png", "preview_step0000004.png"]

"""Exact resume of the VOC fine-tuning runs: a run killed with SIGKILL mid-training and resumed with
--resume ends with the weights of an uninterrupted run (classification, detection with
Fast R-CNN and with Faster R-CNN, segmentation)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssl_colorize.benchmarks import voc_classification, voc_detection, voc_segmentation
from ssl_colorize.data.builtin_voc import make_voc_fixture
from ssl_colorize.engine.finetune import EpochBatches

REPO = Path(__file__).resolve().parent.parent
ITERS, CKPT_EVERY = 8, 3
RECIPES = {
    # fc8 only: the classifier, its momentum and the data position resume exactly (detection covers a whole
    # encoder fine-tuned), at a fraction of fc6-8's cost
    "voc_classification": (voc_classification, ["--finetune", "fc8", "--batch-size", 2, "--test-crops", 1,
                                                "--eval-batch-size", 6]),
    # alexnet_lab's default detector, Fast R-CNN over the fixture's proposals, and Faster R-CNN (a learnt RPN)
    "voc_detection": (voc_detection, ["--train-sizes", "64,80", "--test-size", 72, "--max-size", 128,
                                      "--rois-per-image", 16]),
    "voc_detection_faster_rcnn": (voc_detection, ["--detector", "faster-rcnn", "--train-sizes", "64,80",
                                                  "--test-size", 72, "--max-size", 128, "--anchor-sizes", "16,32,64",
                                                  "--rpn-train-proposals", 64, "--rpn-test-proposals", 32,
                                                  "--rois-per-image", 16]),
    # torchvision AlexNet: its FCN scores conv5 (no fc6 / fc7 to train), the cheapest fine-tuning here
    # (--accumulate 2: each update from two batches, as the released recipe's iter_size)
    "voc_segmentation": (voc_segmentation, ["--encoder", "alexnet_rgb_torchvision", "--recipe", "quick",
                                            "--batch-size", 2, "--crop", 48, "--accumulate", 2]),
}


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc_fixture(tmp_path_factory.mktemp("vocdata"), n_trainval07=5, n_test07=2, n_train12=4, n_val12=2,
                            image_size=(48, 64), bad=("corrupt_image",))


def argv(benchmark: str, voc, out: Path, *extra) -> list[str]:
    options = RECIPES[benchmark][1]
    return [str(a) for a in ("--data", voc.root, "--workers", 0, "--seed", 3, "--iters", ITERS, "--ckpt-every",
                             CKPT_EVERY, "--log-every", 1, "--out", out, "--out-csv", out.parent / "voc.csv",
                             *options, *extra)]


def final_weights(out: Path) -> dict:
    state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert state["step"] == ITERS
    return state["model"]


@pytest.mark.parametrize("benchmark", sorted(RECIPES))
def test_killed_and_resumed_run_reaches_the_uninterrupted_weights(benchmark, voc, tmp_path):
    module = RECIPES[benchmark][0]
    module.cli(argv(benchmark, voc, tmp_path / "full"))
    out = tmp_path / "killed"
    # One intra-op thread, as in this process (conftest): the same reduction order, the same floats.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", module.__name__,
                             *argv(benchmark, voc, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        log = out / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) > CKPT_EVERY:  # past the first checkpoint
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = torch.load(out / "checkpoint.pth", weights_only=False)["step"]
    assert CKPT_EVERY <= step_at_kill < ITERS, "the run was not killed mid-training"
    assert not (out / "summary.json").exists()

    with pytest.raises(SystemExit):  # another data stream than the one that was cut: refused
        module.cli(argv(benchmark, voc, out, "--resume", "--seed", 4))
    summary = module.cli(argv(benchmark, voc, out, "--resume"))
    expected, resumed = final_weights(tmp_path / "full"), final_weights(out)
    assert expected.keys() == resumed.keys()
    different = [name for name in expected if not torch.equal(expected[name], resumed[name])]
    assert not different, different
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, ITERS + 1))  # no step twice after the kill
    full_summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert json.dumps(summary["metrics"], sort_keys=True) == json.dumps(full_summary["metrics"], sort_keys=True)


def test_the_data_stream_restarts_at_any_batch():
    full = EpochBatches(7, 3, drop_last=True, seed=5)
    stream = iter(full)
    batches = [next(stream) for _ in range(8)]  # 2 batches an epoch: 4 epochs
    assert all(len(b) == 3 for b in batches)
    for start in (1, 2, 5):
        restarted = iter(EpochBatches(7, 3, drop_last=True, seed=5, start=start))
        assert [next(restarted) for _ in range(8 - start)] == batches[start:]
    first_epoch = [index for batch in batches[:2] for index, _ in batch]
    assert len(set(first_epoch)) == 6  # a permutation, the 7th image dropped with the last short batch
    assert batches[:2] != batches[2:4]  # a new order each epoch
    seeds = [seed for batch in batches for _, seed in batch]
    assert len(set(seeds)) == len(seeds)  # every draw has its own augmentation seed


class _RandomDraws(torch.utils.data.Dataset):
    """Item i: (i, a number drawn from the global generator, as the augmentations draw theirs)."""

    def __len__(self):
        return 5

    def __getitem__(self, index):
        return index, float(torch.rand(1))


def test_augmentation_draws_do_not_depend_on_workers_or_the_restart_point():
    from torch.utils.data import default_collate

    from ssl_colorize.engine.finetune import batch_stream

    def batches(workers, start, n):
        stream = batch_stream(_RandomDraws(), 2, seed=1, start=start, workers=workers, collate=default_collate)
        return [[t.tolist() for t in next(stream)] for _ in range(n)]

    reference = batches(0, 0, 6)
    assert batches(2, 0, 6) == reference
    assert batches(2, 3, 3) == reference[3:]
    assert batches(0, 4, 2) == reference[4:]
    before = torch.get_rng_state()
    batches(0, 0, 2)
    assert torch.equal(torch.get_rng_state(), before)  # the training's own random stream is left alone

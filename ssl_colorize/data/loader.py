"""The pretraining loader: a sampler of ``(index, sample_seed)`` items -> :class:`PretrainBatch` objects
on the training device, through one of the two data paths of :mod:`ssl_colorize.data.fast_path`.

One loader serves a whole run: given a sampler that spans epochs (the trainer's endless
``ResumableSampler``), the DataLoader and its worker processes are created once and live until the
run ends, instead of being started again every epoch (issue 14).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from contextlib import nullcontext, suppress

import torch
from torch.utils.data import DataLoader

from ssl_colorize.data.fast_path import (
    CropCollate,
    EncodedBatch,
    EncodedFiles,
    PretrainBatch,
    SeededCrops,
    TargetSpec,
    _empty_batch,
    collate_encoded,
    crop_image,
    decode_batch,
    grid_targets,
    lightness_input,
    resolve_data_path,
)
from ssl_colorize.data.images import ImageFiles
from ssl_colorize.data.transforms import RESIZE_MODES

_DONE = object()
#: Where the "workers" path computes the soft targets (``targets_on``; the trainer's ``--targets-on``).
TARGETS_ON = ("workers", "device")
#: How a CUDA batch reaches the training step (``hand_off``; the trainer's ``--hand-off``).
HAND_OFFS = ("thread", "inline")


class PretrainLoader:
    """Iterates ``sampler`` in batches and yields :class:`PretrainBatch` objects on ``device``.

    Args:
        files: the training images (:class:`~ssl_colorize.data.images.ImageFiles`).
        sampler: yields ``(index, sample_seed)`` items (e.g. the trainer's ``ResumableSampler``; an endless
            one, which has no length, makes a loader that runs until its consumer stops).
        batch_size: images per batch (per process).
        crop, resize: the random crop size and the size the image is resized to first (None: as is).
        device: where the batches go.
        data_path: "auto", "workers" or "device" (see the module docstring).
        workers: DataLoader worker processes (0: in this process).
        channels_last: make images (and L) channels-last, as the trainer does on CUDA.
        targets: compute L, ab and the soft encoding in the data path; None: images only.
        prefetch: batches the producer thread may finish ahead of the training step (CUDA or "device").
        pin_memory: page-locked host batches (default: when the device is CUDA).
        resize_mode: "shorter" (the shorter side to ``resize``) or "squash" (both sides, aspect not kept);
            both data paths resize through :func:`~ssl_colorize.data.fast_path.crop_image`.
        hand_off: how a CUDA batch reaches the step: "thread" (a producer thread finishes batches on a
            side stream, ``prefetch`` ahead; the DataLoader pins them in its own thread) or "inline" (no
            thread besides the training one: it pins and copies batch t+1 on a side stream, then hands
            over batch t, so the copy overlaps step t-1's kernels still queued on the GPU; no other Python
            thread competes for the interpreter with the one launching the kernels). On a CPU both are
            the same: the training thread takes the workers' batches.
        targets_on: where the "workers" path computes ab on the loss grid and its soft encoding:
            "workers" (in the collate, on the CPU: 0.16 of a GPU trainer's worker's 1.45 ms per image
            at the paper's alexnet_lab sizes, measured on a 2-core EPYC) or "device" (after the copy, on
            the training device; on CUDA on the hand-off's side stream). The values are the same either way.
            The "device" path always computes them on the device.
    """

    def __init__(
        self,
        files: ImageFiles,
        sampler,
        batch_size: int,
        crop: int,
        resize: int | None,
        device: torch.device | str,
        data_path: str = "auto",
        workers: int = 0,
        channels_last: bool = False,
        targets: TargetSpec | None = None,
        prefetch: int = 2,
        pin_memory: bool | None = None,
        resize_mode: str = "shorter",
        targets_on: str = "workers",
        hand_off: str = "thread",
    ):
        if batch_size < 1:
            raise ValueError(f"PretrainLoader: batch_size must be positive, got {batch_size}")
        if crop < 1:
            raise ValueError(f"PretrainLoader: crop must be positive, got {crop}")
        if workers < 0:
            raise ValueError(f"PretrainLoader: workers must be >= 0, got {workers}")
        if prefetch < 1:
            raise ValueError(f"PretrainLoader: prefetch must be >= 1, got {prefetch}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"PretrainLoader: resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if targets_on not in TARGETS_ON:
            raise ValueError(f"PretrainLoader: targets_on must be one of {TARGETS_ON}, got {targets_on!r}")
        if hand_off not in HAND_OFFS:
            raise ValueError(f"PretrainLoader: hand_off must be one of {HAND_OFFS}, got {hand_off!r}")
        self.hand_off = hand_off
        self.files, self.sampler, self.batch_size = files, sampler, int(batch_size)
        self.crop, self.resize, self.resize_mode, self.targets_on = int(crop), resize, resize_mode, targets_on
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.mode = resolve_data_path(data_path, self.device)
        self.workers, self.channels_last, self.targets, self.prefetch = workers, channels_last, targets, prefetch
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else pin_memory
        self.wait_seconds = 0.0  # time the consumer spent blocked on the next batch
        self.batches = 0

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    # -------------------------------------------------------------------------------- host side

    def host_loader(self) -> DataLoader:
        """The DataLoader of the chosen path: crops (+ targets on the CPU), or the files' bytes."""
        if self.mode == "device":
            dataset, collate = EncodedFiles(self.files), collate_encoded
            pin = False  # nvJPEG stages the bytes through its own pinned buffers
        else:
            dataset = SeededCrops(self.files, self.crop, self.resize, self.resize_mode)
            # Targets left out of the collate are computed by _complete() on the device.
            in_workers = self.targets if self.targets_on == "workers" else None
            collate = CropCollate(self.crop, in_workers, lightness=self.device.type == "cpu")
            # Inline, the training thread pins (in finish()): the DataLoader's pin thread would be a second
            # Python thread in this process.
            pin = self.pin_memory and self.hand_off == "thread"
        return DataLoader(dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=self.workers,
                          collate_fn=collate, pin_memory=pin, prefetch_factor=4 if self.workers else None,
                          persistent_workers=False, generator=torch.Generator().manual_seed(0))
        # Its own generator: starting the loader draws its workers' base seed from it, not from the
        # global RNG that a resumed run restores (nor, in the producer thread, racing the training
        # thread for it). The crops do not depend on it: they come from the sampler's per-sample seeds.

    # ------------------------------------------------------------------------------ device side
    def _complete(self, batch: PretrainBatch) -> PretrainBatch:
        """Memory format and what a worker did not compute (L; ab and the soft encoding), on the device."""
        if self.channels_last:
            batch.images = batch.images.contiguous(memory_format=torch.channels_last)
            if batch.L is not None:
                batch.L = batch.L.contiguous(memory_format=torch.channels_last)
        if self.targets is not None and batch.images.shape[0] > 0:
            if batch.ab is None:
                batch.ab, batch.encoded = grid_targets(batch.images, self.targets)
            if batch.L is None:
                batch.L = lightness_input(batch.images, self.channels_last)
        return batch

    def finish(self, host_batch) -> PretrainBatch:
        """A host batch -> a device batch: decode + crop (device path) or copy (workers path), then
        :meth:`_complete`. Runs in the producer thread, on its side stream when on CUDA."""
        if isinstance(host_batch, EncodedBatch):
            decoded = decode_batch(host_batch.data, self.device)
            crops, keep, skipped = [], [], list(host_batch.skipped)
            for j, image in enumerate(decoded):
                if image is None:
                    skipped.append(host_batch.paths[j])
                    continue
                crops.append(crop_image(image, self.crop, self.resize, host_batch.seeds[j], self.resize_mode))
                keep.append(j)
            if not crops:
                return _empty_batch(self.crop, skipped, self.device)
            batch = PretrainBatch(
                torch.stack(crops),
                torch.tensor([host_batch.labels[j] for j in keep], dtype=torch.long).to(self.device),
                torch.tensor([host_batch.indices[j] for j in keep], dtype=torch.long).to(self.device),
                skipped,
            )
        else:
            if self.pin_memory and not host_batch.images.is_pinned():  # inline: no DataLoader pin thread
                host_batch = host_batch.pin_memory()
            batch = host_batch.to(self.device, non_blocking=self.pin_memory)
        return self._complete(batch)

    def _needs_producer(self) -> bool:
        return self.mode == "device" or self.device.type == "cuda"

    # -------------------------------------------------------------------------------- iteration
    def __iter__(self):
        if self.hand_off == "thread" and self._needs_producer():
            yield from self._iter_producer()
        else:
            yield from self._iter_inline()

    def _iter_inline(self):
        """The training thread finishes the next batch (on CUDA: on a side stream, recorded with an event)
        before it hands over the current one: one batch ahead, no other thread. On a CPU with the workers
        path the workers' batches are then final but for the memory format."""
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        iterator = iter(self.host_loader())

        def start_next():
            try:
                host_batch = next(iterator)
            except StopIteration:
                return None
            with torch.cuda.stream(stream) if cuda else nullcontext():
                batch = self.finish(host_batch)
                event = None
                if cuda:
                    event = torch.cuda.Event()
                    event.record(stream)
            return batch, event

        try:
            start = time.perf_counter()
            upcoming = start_next()
            while upcoming is not None:
                batch, event = upcoming
                upcoming = start_next()  # while the GPU still runs the kernels the last step queued
                if event is not None:
                    self._wait_on_device(batch, event)
                self.wait_seconds += time.perf_counter() - start
                self.batches += 1
                yield batch
                start = time.perf_counter()
        finally:
            # A consumer that stops early (an endless sampler) ends the worker processes now: the last
            # reference to the DataLoader iterator (shared with start_next) goes.
            iterator = None  # noqa: F841

    def _wait_on_device(self, batch: PretrainBatch, event) -> None:
        """The step's stream waits for the side stream's work on this batch (no host sync), and the
        allocator must not recycle the batch's memory before the step is done with it."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for tensor in batch.tensors():
            tensor.record_stream(current)

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        """Producer thread: finish host batches on a side stream, hand them over with an event."""
        cuda = self.device.type == "cuda"
        try:
            with torch.cuda.device(self.device) if cuda else nullcontext():
                stream = torch.cuda.Stream(self.device) if cuda else None
                with torch.cuda.stream(stream) if cuda else nullcontext():
                    for host_batch in self.host_loader():
                        batch = self.finish(host_batch)
                        event = None
                        if cuda:
                            event = torch.cuda.Event()
                            event.record(stream)
                        if not self._put(out, (batch, event), stop):
                            return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(out, exc, stop)
            return
        self._put(out, _DONE, stop)

    @staticmethod
    def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _iter_producer(self):
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(out, stop), name="pretrain-data", daemon=True)
        thread.start()
        try:
            while True:
                start = time.perf_counter()
                item = out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the pretraining data path failed: {item}") from item
                batch, event = item
                if event is not None:
                    self._wait_on_device(batch, event)
                self.wait_seconds += time.perf_counter() - start
                self.batches += 1
                yield batch
        finally:
            stop.set()
            while thread.is_alive():  # drain, so a producer blocked on a full queue can see the stop
                with suppress(queue.Empty):
                    out.get(timeout=0.1)
            thread.join()

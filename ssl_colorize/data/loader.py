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
        self.files, self.sampler, self.batch_size = files, sampler, int(batch_size)
        self.crop, self.resize, self.resize_mode = int(crop), resize, resize_mode
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
            collate = CropCollate(self.crop, self.targets, lightness=self.device.type == "cpu")
            pin = self.pin_memory
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
            batch = host_batch.to(self.device, non_blocking=self.pin_memory)
        return self._complete(batch)

    def _needs_producer(self) -> bool:
        return self.mode == "device" or self.device.type == "cuda"

    # -------------------------------------------------------------------------------- iteration
    def __iter__(self):
        if not self._needs_producer():
            yield from self._iter_direct()
        else:
            yield from self._iter_producer()

    def _iter_direct(self):
        """CPU training with workers: the workers' batches are final."""
        iterator = iter(self.host_loader())
        try:
            while True:
                start = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                batch = self._complete(batch)
                self.wait_seconds += time.perf_counter() - start
                self.batches += 1
                yield batch
        finally:
            del iterator  # a consumer that stops early (an endless sampler) ends the worker processes now

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
                    # The step's stream waits for the side stream's work on this batch (no host sync),
                    # and the allocator must not recycle the batch's memory before the step is done.
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for tensor in batch.tensors():
                        tensor.record_stream(current)
                self.wait_seconds += time.perf_counter() - start
                self.batches += 1
                yield batch
        finally:
            stop.set()
            while thread.is_alive():  # drain, so a producer blocked on a full queue can see the stop
                with suppress(queue.Empty):
                    out.get(timeout=0.1)
            thread.join()

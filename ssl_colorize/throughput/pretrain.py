"""Section ``pretrain`` (issues 7 and 14): the trainer's own loop, against what bounds it and what it replaces.

Per encoder with a colour head, at the paper's sizes (the encoder card's pretraining recipe: crop and
batch) or reduced ones with ``--quick`` (crop 64, a tenth of the batch, at least 4), three measurements:

* ``trainer``: the very function the CLI calls, ``ssl_colorize.pretrain.main`` on a parsed argument
  namespace, reading a JPEG list file (``--data LIST --steps N --log-every K --out DIR --no-progress``).
  The rate is read from the run's ``log.jsonl`` (``images_per_sec`` records) over the steady window after
  the warm-up steps: the median record, as ``ms_per_step`` is a median elsewhere. Before it, the trainer's
  data path alone (:mod:`ssl_colorize.data.fast_path`: JPEG -> L + soft targets, no network) is timed.
* ``compute``: the bound no data path can beat, a synthetic batch whose L and soft targets are already on
  the device (network, loss, backward, Adam); and the model's FLOPs per image, counted with
  ``torch.utils.flop_counter.FlopCounterMode`` (forward, and forward + loss + backward).
* ``reference``: the same step fed by the released code's data path (:class:`ssl_colorize.reference.ReferenceData`:
  PIL, scikit-image, scikit-learn, a dense target and loss), same model, batch and crops.
"""

from __future__ import annotations

import collections
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ssl_colorize.targets import DEFAULT_K, DEFAULT_SIGMA
from ssl_colorize.throughput import measure
from ssl_colorize.throughput.report import TARGETS, Report
from ssl_colorize.throughput.runner import run_all

VARIANTS = ("compute", "trainer", "reference")
#: Images the trainer holds out of a data set larger than 64 for its previews (ssl_colorize.pretrain.build_data).
HELD_OUT = 8


def sizes(encoder: str, quick: bool, crop: int | None = None, batch: int | None = None) -> tuple[int, int]:
    """(crop, batch) of an encoder: the card's paper recipe (docs/protocols.md section 3), or with ``quick``
    a 64 px crop and a tenth of the batch (at least 4), sizes a 2-core CPU runs in seconds per step."""
    from ssl_colorize.models import get_card

    recipe = get_card(encoder).pretrain
    if recipe is None:
        raise ValueError(f"--encoders {encoder}: it has no colour head, so no pretraining recipe")
    default_crop, default_batch = (64, max(4, recipe.batch_size // 10)) if quick else (recipe.crop, recipe.batch_size)
    return crop or default_crop, batch or default_batch


def steady_rate(records: list[dict], warmup: int) -> tuple[float, float, int]:
    """(median, overall) images per second over the ``log.jsonl`` records after ``warmup`` steps, and
    their count. A record covers the steps since the previous one; it counts when all of them come
    after the warm-up. ``overall`` is the window's images over its time (the harmonic mean of the rates)."""
    window, previous = [], 0
    for record in sorted((r for r in records if "images_per_sec" in r), key=lambda r: r["step"]):
        if previous >= warmup:
            window.append((record["step"] - previous, float(record["images_per_sec"])))
        previous = record["step"]
    if not window:
        raise ValueError(f"log.jsonl holds no rate record after the {warmup} warm-up steps")
    rates = [rate for _, rate in window]
    overall = sum(n for n, _ in window) / sum(n / rate for n, rate in window)
    return statistics.median(rates), overall, len(window)


def _model(job: dict, device: torch.device):
    """The trainer's model, Adam (the card's recipe; fused on CUDA) and precision (bf16 autocast and
    channels-last on CUDA), as ``ssl_colorize.pretrain`` builds them."""
    from ssl_colorize.models import create_model, get_card

    recipe = get_card(job["encoder"]).pretrain
    model = create_model(job["encoder"]).to(device).train()
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay,
                                 fused=True if device.type == "cuda" else None)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    forward = model.logits_at
    if job.get("compile"):
        forward = torch.compile(forward, mode=None if job["compile"] == "default" else job["compile"])
    return model, forward, optimizer, amp_dtype, channels_last


def _logits(forward, L: torch.Tensor, grid, amp_dtype) -> torch.Tensor:
    with torch.autocast(L.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return forward(L, tuple(grid))


def _loss_ours(forward, L, ab, encoded, class_weights, amp_dtype) -> torch.Tensor:
    """The trainer's loss (grey images weighted 0, soft targets from the data path when given)."""
    from ssl_colorize.losses import soft_target_cross_entropy
    from ssl_colorize.targets import grey_mask

    logits = _logits(forward, L, ab.shape[-2:], amp_dtype)
    return soft_target_cross_entropy(logits, ab, class_weights, image_weights=(~grey_mask(ab)).float(), encoded=encoded)


def _update(optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def count_flops(model, L: torch.Tensor, ab: torch.Tensor, class_weights) -> dict:
    """FLOPs per image of the model's forward and of a training step's forward + loss + backward (one image)."""
    from torch.utils.flop_counter import FlopCounterMode

    L1, ab1 = L[:1], ab[:1]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.logits_at(L1, tuple(ab1.shape[-2:]))
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        _loss_ours(model.logits_at, L1, ab1, None, class_weights, None).backward()
    model.zero_grad(set_to_none=True)
    return {"gflops_per_image": forward / 1e9, "train_gflops_per_image": counter.get_total_flops() / 1e9}


def job_compute(job: dict, device: torch.device) -> dict:
    from ssl_colorize.data.fast_path import TargetSpec, prepare_targets
    from ssl_colorize.targets import load_prior, rebalance_weights

    model, forward, optimizer, amp_dtype, channels_last = _model(job, device)
    class_weights = rebalance_weights(load_prior()).to(device)
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (job["batch"], 3, job["crop"], job["crop"]), dtype=torch.uint8, generator=g).to(device)
    L, ab, encoded = prepare_targets(images, TargetSpec(model.output_stride, DEFAULT_K, DEFAULT_SIGMA), channels_last)
    flops = count_flops(model, L, ab, class_weights)
    times = []
    for i in range(job["warmup"] + job["steps"]):
        measure.sync(device)
        start = time.perf_counter()
        _update(optimizer, _loss_ours(forward, L, ab, encoded, class_weights, amp_dtype))
        measure.sync(device)
        if i >= job["warmup"]:
            times.append(time.perf_counter() - start)
    return {**measure.step_stats(times, job["batch"]), **flops, "data_wait_share": 0.0}


def job_reference(job: dict, device: torch.device) -> dict:
    from ssl_colorize.reference import ReferenceData, ReferenceEncoder, dense_cross_entropy

    model, forward, optimizer, amp_dtype, channels_last = _model(job, device)
    paths = measure.jpeg_paths(job["jpeg_dir"])
    batch, data_batches = job["batch"], max(job["steps"], 2)
    data = ReferenceData(paths, job["crop"], job["resize"], model.output_stride, ReferenceEncoder())
    items = list(measure.CyclingSampler(len(paths), (data_batches + job["warmup"] + job["steps"]) * batch, seed=7))
    chunks = [items[i : i + batch] for i in range(0, len(items), batch)]
    start = time.perf_counter()
    for chunk in chunks[:data_batches]:  # the data path alone
        data.batch(chunk, device)
    measure.sync(device)
    result = {"data_only_images_per_s": data_batches * batch / (time.perf_counter() - start)}
    times, waited = [], 0.0
    for i, chunk in enumerate(chunks[data_batches:]):
        measure.sync(device)
        start = time.perf_counter()
        L, target, weights = data.batch(chunk, device)  # in the step's own thread, as the Caffe layers ran
        if channels_last:
            L = L.contiguous(memory_format=torch.channels_last)
        t_data = time.perf_counter() - start
        _update(optimizer, dense_cross_entropy(_logits(forward, L, target.shape[-2:], amp_dtype), target, weights))
        measure.sync(device)
        if i >= job["warmup"]:
            times.append(time.perf_counter() - start)
            waited += t_data
    return {**result, **measure.step_stats(times, batch), "data_wait_share": waited / sum(times)}


def _data_only_rate(job: dict, device: torch.device, stride: int) -> tuple[float, str]:
    """Images per second of the trainer's data path alone (the path 'auto' picks), first batch not counted."""
    from ssl_colorize.data import ImageFiles
    from ssl_colorize.data.fast_path import TargetSpec, resolve_data_path
    from ssl_colorize.data.loader import PretrainLoader

    files = ImageFiles(job["jpeg_dir"])
    path = resolve_data_path("auto", device)
    batches = max(job["steps"], 2 * job["workers"] + 3)
    loader = PretrainLoader(files, measure.CyclingSampler(len(files), (batches + 1) * job["batch"], seed=7), job["batch"],
                            job["crop"], job["resize"], device, path, workers=job["workers"],
                            channels_last=device.type == "cuda", targets=TargetSpec(stride, DEFAULT_K, DEFAULT_SIGMA))
    iterator = iter(loader)
    next(iterator)  # worker start-up and the first batch are not counted
    measure.sync(device)
    start = time.perf_counter()
    collections.deque(iterator, maxlen=0)
    measure.sync(device)
    return batches * job["batch"] / (time.perf_counter() - start), path


#: Trainer options the measurement can do without (the rest are its public contract): left out, with a
#: note, should a version of ``ssl_colorize.pretrain`` not have them.
OPTIONAL_TRAINER_OPTIONS = ("--workers", "--ckpt-every", "--compile")


def trainer_argv(job: dict, data_list: Path, out: Path, log_every: int) -> list[str]:
    """The command line of the trainer's run (``ssl_colorize.pretrain``'s public options). The rolling
    checkpoint and its preview come at the last step only, after the timed window."""
    total = job["warmup"] + job["steps"]
    argv = ["--encoder", job["encoder"], "--data", str(data_list), "--steps", str(total),
            "--batch-size", str(job["batch"]), "--crop", str(job["crop"]), "--device", job["device"],
            "--log-every", str(log_every), "--out", str(out), "--no-progress",
            "--workers", str(job["workers"]), "--ckpt-every", str(total)]
    return argv + (["--compile", job["compile"]] if job.get("compile") else [])


def parse_trainer_args(parser, argv: list[str]):
    """(namespace, optional options the trainer does not know); any other unknown option is an error."""
    args, unknown = parser.parse_known_args(argv)
    flags = [a for a in unknown if a.startswith("--")]
    missing = [f for f in flags if f not in OPTIONAL_TRAINER_OPTIONS]
    if missing:
        raise RuntimeError(f"ssl_colorize.pretrain no longer takes {missing}: update ssl_colorize.throughput.pretrain")
    return args, flags


def job_trainer(job: dict, device: torch.device) -> dict:
    from ssl_colorize import pretrain
    from ssl_colorize.models import create_model

    stride = create_model(job["encoder"]).output_stride
    data_rate, data_path = _data_only_rate(job, device, stride)
    total = job["warmup"] + job["steps"]
    log_every = max(1, job["steps"] // 10)  # ten rate records in the window: enough for a median
    work = Path(tempfile.mkdtemp(prefix="throughput-trainer-"))
    try:
        # One epoch covers the run (the list repeats the files): no loader restart inside the window.
        paths = measure.jpeg_paths(job["jpeg_dir"])
        needed = (total + 1) * job["batch"] + HELD_OUT
        (work / "images.txt").write_text("".join(f"{paths[i % len(paths)]}\n" for i in range(needed)))
        parser = pretrain.get_args_parser()
        args, ignored = parse_trainer_args(parser, trainer_argv(job, work / "images.txt", work / "run", log_every))
        if hasattr(pretrain, "validate"):  # the entry-point convention: checks first, then main
            pretrain.validate(args)
        pretrain.main(args)
        records = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines() if line.strip()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median, overall, count = steady_rate(records, job["warmup"])
    return {"images_per_s": median, "ms_per_step": 1e3 * job["batch"] / median, "overall_images_per_s": overall,
            "log_records": count, "log_every": log_every, "data_only_images_per_s": data_rate, "data_path": data_path,
            "ignored_options": ignored}


def run_job(job: dict) -> dict:
    """One (encoder, variant) in this process: 'compute', 'trainer' or 'reference'."""
    if job["variant"] not in VARIANTS:
        raise ValueError(f"unknown pretrain variant {job['variant']!r}")
    device = measure.setup(job)
    result = {"compute": job_compute, "trainer": job_trainer, "reference": job_reference}[job["variant"]](job, device)
    import gc

    gc.collect()  # the loaders are gone: their worker processes have been joined
    return {**result, "peak_host_mb": measure.peak_host_mb(), "peak_device_mb": measure.peak_device_mb(device),
            "peak_worker_mb": measure.peak_children_mb()}


def flop_rate(tflops: float) -> str:
    """``12.3 TFLOP/s``, or in GFLOP/s below one TFLOP/s (a CPU)."""
    return f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{1e3 * tflops:.1f} GFLOP/s"


def prepare_jpegs(args, needed: int) -> tuple[Path, bool]:
    """(folder of JPEGs, whether it is our temporary folder): ``--jpeg-dir`` (filled when empty) or a new one."""
    count = args.jpeg_count or min(needed, 1024)
    if args.jpeg_dir:
        folder = Path(args.jpeg_dir)
        if not folder.is_dir() or not measure.jpeg_paths(folder):
            print(f"throughput: writing {count} JPEGs to {folder}", flush=True)
            measure.write_jpegs(folder, count, args.jpeg_size)
        return folder, False
    folder = Path(tempfile.mkdtemp(prefix="throughput-jpegs-"))
    print(f"throughput: writing {count} JPEGs ({args.jpeg_size} px shorter side) to {folder}", flush=True)
    return measure.write_jpegs(folder, count, args.jpeg_size), True


def run_section(args, device: torch.device, common: dict, report: Report) -> None:
    from ssl_colorize.models import get_card

    steps = args.steps if args.steps is not None else (5 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    from ssl_colorize.models.cards import pretrainable_models

    encoders = measure.comma_list(args.encoders) if args.encoders else pretrainable_models()
    plan = {e: sizes(e, args.quick, args.crop, args.batch_size) for e in encoders}
    folder, temporary = prepare_jpegs(args, max(b * (steps + warmup + 1) for _, b in plan.values()) + HELD_OUT)
    jobs = [{**common, "section": "pretrain", "encoder": e, "crop": c, "batch": b, "steps": steps, "warmup": warmup,
             "resize": get_card(e).pretrain.resize, "jpeg_dir": str(folder), "variant": v, "compile": args.compile}
            for e, (c, b) in plan.items() for v in VARIANTS]
    try:
        results = run_all(jobs, not args.no_progress)
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
    by_key = {(j["encoder"], j["variant"]): r for j, r in zip(jobs, results)}
    for encoder, (crop, batch) in plan.items():
        compute, trainer, ref = (by_key[(encoder, v)] for v in VARIANTS)
        settings = {"encoder": encoder, "crop": crop, "batch": batch, "steps": steps, "warmup": warmup,
                    "resize": get_card(encoder).pretrain.resize, "workers": common["workers"], "compile": args.compile or "none",
                    "amp": "bf16" if device.type == "cuda" else "none", "channels_last": device.type == "cuda",
                    "gflops_per_image": compute["gflops_per_image"], "train_gflops_per_image": compute["train_gflops_per_image"]}
        tflops = {name: compute["train_gflops_per_image"] * r["images_per_s"] / 1e3 for name, r in
                  (("compute", compute), ("trainer", trainer), ("reference", ref))}
        bound = trainer["images_per_s"] / compute["images_per_s"]
        report.add("pretrain", f"{encoder}/compute", {**settings, "achieved_tflops": tflops["compute"],
                                                      "data": "synthetic batch, L and targets ready on the device"}, compute)
        report.add("pretrain", f"{encoder}/reference",
                   {**settings, "achieved_tflops": tflops["reference"],
                    "data": "PIL + skimage rgb2lab + sklearn ball tree + dense target, in-process",
                    "data_only_images_per_s": ref["data_only_images_per_s"], "data_wait_share": ref["data_wait_share"]},
                   ref, 1.0)
        ratio = trainer["images_per_s"] / ref["images_per_s"]
        report.add("pretrain", f"{encoder}/trainer",
                   {**settings, "achieved_tflops": tflops["trainer"], "data_path": trainer["data_path"],
                    "data": f"ssl_colorize.pretrain.main on a JPEG list (fast_path: {trainer['data_path']})",
                    "rate": f"median of {trainer['log_records']} log.jsonl records after {warmup} warm-up steps",
                    "log_every": trainer["log_every"], "ignored_options": trainer["ignored_options"], "overall_images_per_s": trainer["overall_images_per_s"],
                    "data_only_images_per_s": trainer["data_only_images_per_s"], "vs_compute": bound,
                    "peak_worker_mb": trainer["peak_worker_mb"]}, trainer, ratio)
        report.verdict(f"pretrain_trainer_{encoder}", ratio, f"{trainer['images_per_s']:.1f} img/s",
                       f"{ref['images_per_s']:.1f} img/s", TARGETS["pretrain_step_cpu"] if report.kind == "cpu" else None)
        report.verdict(f"data_path_{encoder}", trainer["data_only_images_per_s"] / ref["data_only_images_per_s"],
                       f"{trainer['data_only_images_per_s']:.0f} img/s", f"{ref['data_only_images_per_s']:.0f} img/s")
        note = (f"{encoder}: the trainer runs at {trainer['images_per_s']:.1f} img/s, {bound:.2f}x the compute-only bound "
                f"({compute['images_per_s']:.1f} img/s); {compute['gflops_per_image']:.2f} GFLOP per image forward, "
                f"{compute['train_gflops_per_image']:.2f} per training step: {flop_rate(tflops['trainer'])} achieved "
                f"({flop_rate(tflops['compute'])} compute only)")
        if report.kind == "cuda":
            note += f" [target: within {100 * TARGETS['data_wait_share_cuda']:.0f}% of the bound: "
            note += f"{'met' if bound >= 1 - TARGETS['data_wait_share_cuda'] else 'not met'}]"
        if trainer["ignored_options"]:
            report.notes.append(f"{encoder} trainer: this ssl_colorize.pretrain has no {trainer['ignored_options']}; "
                                "ran without them (checkpoints inside the window would lower the rate)")
        if args.target_images_per_s:
            met = trainer["images_per_s"] >= args.target_images_per_s
            note += f" [target >= {args.target_images_per_s:g} img/s: {'met' if met else 'not met'}]"
        report.notes.append(note)

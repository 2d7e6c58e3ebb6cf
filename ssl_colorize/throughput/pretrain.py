"""Section ``pretrain`` (issues 7 and 14): the trainer's own loop, against what bounds it and what it replaces.

Per encoder with a colour head, at the paper's sizes (the encoder card's pretraining recipe: crop and
batch) or reduced ones with ``--quick`` (crop 64, a tenth of the batch, at least 4):

* ``trainer`` (one row per configuration of ``--trainer-variants``) and ``trainer_folder``: the very
  function the CLI calls, on a JPEG list and on an ImageFolder, its rate read from its own ``log.jsonl``
  over the steady window after the warm-up; with the trainer's data path alone and one worker's costs
  (:mod:`ssl_colorize.throughput.trainer`, :mod:`ssl_colorize.throughput.worker_cost`).
* ``compute``: the bound no data path can beat, a synthetic batch whose L and soft targets are already on
  the device (network, loss, backward, Adam); and the model's FLOPs per image, counted with
  ``torch.utils.flop_counter.FlopCounterMode`` (forward, and forward + loss + backward).
* ``reference``: the same step fed by the released code's data path (:class:`ssl_colorize.reference.ReferenceData`:
  PIL, scikit-image, scikit-learn, a dense target and loss), same model, batch and crops.

Once per run, ``machine/matmul``: the device's dense matrix-multiply rate (:mod:`ssl_colorize.throughput.machine`),
over which every row's achieved FLOP/s is its model FLOP utilisation.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from ssl_colorize.targets import DEFAULT_K, DEFAULT_SIGMA
from ssl_colorize.throughput import machine, measure, trainer, worker_cost
from ssl_colorize.throughput.report import TARGETS, Report
from ssl_colorize.throughput.runner import run_all

VARIANTS = ("compute", "reference", "trainer", "trainer_folder")
#: Rows ``--skip`` may leave out (compute and the trainer are what every other row is read against).
OPTIONAL_ROWS = ("reference", "trainer_folder")
#: JPEGs written by default at the paper's sizes: the ImageFolder of issue 14's epoch-boundary measurement
#: (3,576 files there), so that an epoch is as long as it was.
FOLDER_JPEGS = 3600
#: The reference's timed (and warm-up) steps at most: at about 150 img/s on an H100 its rate is steady
#: within a few steps, and 250 steps of it would take minutes of device time.
REFERENCE_STEPS, REFERENCE_WARMUP = 20, 5


def sizes(encoder: str, quick: bool, crop: int | None = None, batch: int | None = None) -> tuple[int, int]:
    """(crop, batch) of an encoder: the card's paper recipe (docs/protocols.md section 3), or with ``quick``
    a 64 px crop and a tenth of the batch (at least 4), sizes a 2-core CPU runs in seconds per step."""
    from ssl_colorize.models import get_card

    recipe = get_card(encoder).pretrain
    if recipe is None:
        raise ValueError(f"--encoders {encoder}: it has no colour head, so no pretraining recipe")
    default_crop, default_batch = (64, max(4, recipe.batch_size // 10)) if quick else (recipe.crop, recipe.batch_size)
    return crop or default_crop, batch or default_batch


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


def run_job(job: dict) -> dict:
    """One measurement in this process: 'matmul' (once per run), or per encoder 'compute', 'reference',
    'trainer' (a configuration) or 'trainer_folder'."""
    if job["variant"] == "matmul":
        return machine.run_job(job)
    if job["variant"] not in VARIANTS:
        raise ValueError(f"unknown pretrain variant {job['variant']!r}")
    device = measure.setup(job)
    measurement = {"compute": job_compute, "reference": job_reference, "trainer": trainer.job_trainer,
                   "trainer_folder": trainer.job_trainer}[job["variant"]]
    result = measurement(job, device)
    import gc

    gc.collect()  # the loaders are gone: their worker processes have been joined
    return {**result, "peak_host_mb": measure.peak_host_mb(), "peak_device_mb": measure.peak_device_mb(device),
            "peak_worker_mb": measure.peak_children_mb()}


def prepare_jpegs(args, needed: int) -> tuple[Path, bool]:
    """(folder of JPEGs, whether it is our temporary folder): ``--jpeg-dir`` (filled when empty) or a new
    one. Default count: with ``--quick`` enough for one pass (at most 1024), else :data:`FOLDER_JPEGS`."""
    count = args.jpeg_count or (min(needed, 1024) if args.quick else FOLDER_JPEGS)
    if args.jpeg_dir:
        folder = Path(args.jpeg_dir)
        if not folder.is_dir() or not measure.jpeg_paths(folder):
            print(f"throughput: writing {count} JPEGs to {folder}", flush=True)
            measure.write_jpegs(folder, count, args.jpeg_size)
        return folder, False
    folder = Path(tempfile.mkdtemp(prefix="throughput-jpegs-"))
    print(f"throughput: writing {count} JPEGs ({args.jpeg_size} px shorter side) to {folder}", flush=True)
    return measure.write_jpegs(folder, count, args.jpeg_size), True


def folder_images(args, jpegs: int, batch: int) -> int:
    """Files of the ``trainer_folder`` run: all the benchmark's JPEGs; with ``--quick`` (and no
    ``--jpeg-count``) two batches' worth, so that its window crosses epoch boundaries within a few steps."""
    return min(jpegs, 2 * batch) if args.quick and not args.jpeg_count else jpegs


def _plan_jobs(args, common: dict, plan: dict, jpeg_dir: Path, steps: int, warmup: int) -> list[dict]:
    """The section's measurements: the matrix rate, then per encoder compute, reference, each trainer
    configuration (the first also times the data path alone and one worker) and the folder run."""
    from ssl_colorize.models import get_card

    variants = trainer.parse_variants(getattr(args, "trainer_variants", None) or trainer.DEFAULT_VARIANT)
    jpegs = len(measure.jpeg_paths(jpeg_dir))
    skip = set(measure.comma_list(getattr(args, "skip", "") or ""))
    jobs = [{**common, "section": "pretrain", "encoder": "machine", "variant": "matmul"}]
    for encoder, (crop, batch) in plan.items():
        recipe = get_card(encoder).pretrain
        base = {**common, "section": "pretrain", "encoder": encoder, "crop": crop, "batch": batch, "steps": steps,
                "warmup": warmup, "resize": recipe.resize, "resize_mode": recipe.resize_mode, "jpeg_dir": str(jpeg_dir),
                "compile": args.compile}
        in_folder = folder_images(args, jpegs, batch)
        timed = trainer.trainer_steps(steps, in_folder, batch)
        jobs.append({**base, "variant": "compute"})
        if "reference" not in skip:
            jobs.append({**base, "variant": "reference", "steps": min(steps, REFERENCE_STEPS),
                         "warmup": min(warmup, REFERENCE_WARMUP)})
        jobs += [{**base, "variant": "trainer", "steps": timed, "trainer_name": name, "trainer_options": options,
                  "measure_data": i == 0} for i, (name, options) in enumerate(variants)]
        if "trainer_folder" not in skip:
            jobs.append({**base, "variant": "trainer_folder", "steps": timed, "trainer_name": "trainer_folder",
                         "folder_images": in_folder})
    return jobs


def run_section(args, device: torch.device, common: dict, report: Report) -> None:
    from ssl_colorize.models.cards import pretrainable_models

    steps = args.steps if args.steps is not None else (5 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    encoders = measure.comma_list(args.encoders) if args.encoders else pretrainable_models()
    plan = {e: sizes(e, args.quick, args.crop, args.batch_size) for e in encoders}
    needed = max(b * (steps + warmup + 1) for _, b in plan.values()) + trainer.HELD_OUT
    folder, temporary = prepare_jpegs(args, needed)
    try:
        jobs = _plan_jobs(args, common, plan, folder, steps, warmup)
        results = run_all(jobs, not args.no_progress)
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
    matmul = results[0]
    line = (f"{matmul['matmul_dtype']} matrix rate {machine.flop_rate(matmul['matmul_tflops'])} "
            f"({matmul['matmul_size']}^3 products, median of {matmul['matmul_repeats']}, {report.threads} threads)")
    print(f"throughput: {line}", flush=True)
    report.notes.append(f"machine: {line}; each row's mfu (settings) is its achieved FLOP/s over it")
    report.add("pretrain", "machine/matmul", {k: v for k, v in matmul.items() if k.startswith("matmul_")}, matmul)
    for encoder, (crop, batch) in plan.items():
        mine = [(j, r) for j, r in zip(jobs[1:], results[1:]) if j["encoder"] == encoder]
        _report_encoder(args, report, device, mine, matmul, common["workers"])


def _report_encoder(args, report: Report, device: torch.device, measured: list[tuple[dict, dict]], matmul: dict,
                    workers: int) -> None:
    """An encoder's rows, notes and verdicts from its (job, result) pairs."""
    by_variant = {j["variant"]: (j, r) for j, r in measured if j["variant"] in ("compute", "reference", "trainer_folder")}
    configurations = [(j, r) for j, r in measured if j["variant"] == "trainer"]
    job, compute = by_variant["compute"]
    ref_job, ref = by_variant.get("reference", (None, None))  # None: left out with --skip
    encoder = job["encoder"]
    settings = {"encoder": encoder, "crop": job["crop"], "batch": job["batch"], "steps": job["steps"],
                "warmup": job["warmup"], "resize": job["resize"], "resize_mode": job["resize_mode"], "workers": workers,
                "compile": args.compile or "none", "amp": "bf16" if device.type == "cuda" else "none",
                "channels_last": device.type == "cuda", "gflops_per_image": compute["gflops_per_image"],
                "train_gflops_per_image": compute["train_gflops_per_image"], "matmul_tflops": matmul["matmul_tflops"]}

    def flops(result: dict, key: str = "images_per_s") -> dict:
        achieved = machine.achieved_tflops(compute["train_gflops_per_image"], result[key])
        return {"achieved_tflops": achieved, "mfu": machine.utilisation(achieved, matmul["matmul_tflops"])}

    report.add("pretrain", f"{encoder}/compute", {**settings, **flops(compute),
                                                  "data": "synthetic batch, L and targets ready on the device"}, compute)
    if ref is not None:
        report.add("pretrain", f"{encoder}/reference",
                   {**settings, **flops(ref), "steps": ref_job["steps"], "warmup": ref_job["warmup"],
                    "data": "PIL + skimage rgb2lab + sklearn ball tree + dense target, in-process",
                    "data_only_images_per_s": ref["data_only_images_per_s"], "data_wait_share": ref["data_wait_share"]},
                   ref, 1.0)
    for i, (tjob, result) in enumerate(configurations):
        name, bound = tjob["trainer_name"], result["images_per_s"] / compute["images_per_s"]
        row = {**settings, **flops(result), "steps": tjob["steps"], "trainer_options": tjob["trainer_options"],
               "data": f"ssl_colorize.pretrain.main on a JPEG list {' '.join(tjob['trainer_options'])}".rstrip(),
               "rate": f"median of {result['log_records']} log.jsonl records after {tjob['warmup']} warm-up steps",
               "log_every": result["log_every"], "ignored_options": result["ignored_options"],
               "overall_images_per_s": result["overall_images_per_s"], "vs_compute": bound,
               "data_wait_share": result.get("data_wait_share"),
               "peak_worker_mb": result["peak_worker_mb"]}
        if "data_only_images_per_s" in result:
            row.update({k: result[k] for k in ("data_only_images_per_s", "data_path", "data_only_skipped_batches",
                                               "data_only_timed_batches")}, worker_cost=result["worker_cost"])
        ratio = result["images_per_s"] / ref["images_per_s"] if ref is not None else None
        report.add("pretrain", f"{encoder}/{name}", row, result, ratio)
        note = (f"{encoder} {name}: {result['images_per_s']:.1f} img/s (overall {result['overall_images_per_s']:.1f}), "
                f"{bound:.2f}x the compute-only bound ({compute['images_per_s']:.1f} img/s){waiting(result)}; "
                f"{machine.describe(row['achieved_tflops'], matmul)}")
        if i == 0 and ref is not None:
            report.verdict(f"pretrain_trainer_{encoder}", ratio, f"{result['images_per_s']:.1f} img/s",
                           f"{ref['images_per_s']:.1f} img/s", TARGETS["pretrain_step_cpu"] if report.kind == "cpu" else None)
        if i == 0:
            note = (f"{encoder}: the trainer runs at {result['images_per_s']:.1f} img/s, {bound:.2f}x the compute-only "
                    f"bound ({compute['images_per_s']:.1f} img/s){waiting(result)}; "
                    f"{compute['gflops_per_image']:.2f} GFLOP per image "
                    f"forward, {compute['train_gflops_per_image']:.2f} per training step: "
                    f"{machine.describe(row['achieved_tflops'], matmul)} "
                    f"({machine.describe(flops(compute)['achieved_tflops'], matmul)} compute only)")
            if args.target_images_per_s:
                met = result["images_per_s"] >= args.target_images_per_s
                note += f" [target >= {args.target_images_per_s:g} img/s: {'met' if met else 'not met'}]"
        if report.kind == "cuda":
            note += f" [target: within {100 * TARGETS['data_wait_share_cuda']:.0f}% of the bound: "
            note += f"{'met' if bound >= 1 - TARGETS['data_wait_share_cuda'] else 'not met'}]"
        report.notes.append(note)
        if result["ignored_options"]:
            report.notes.append(f"{encoder} {name}: this ssl_colorize.pretrain has no {result['ignored_options']}; "
                                "ran without them (checkpoints inside the window would lower the rate)")
        if "data_only_images_per_s" in result:
            _data_notes(report, encoder, result, ref, compute, workers)
    if "trainer_folder" not in by_variant:  # left out with --skip
        return
    defaults = [c for c in configurations if not c[0]["trainer_options"]]  # the folder run's own options
    _folder_report(report, encoder, settings, by_variant["trainer_folder"], (defaults or configurations)[0], compute, flops)


def waiting(result: dict) -> str:
    """``, 1.4% of the window waiting for data`` (from the trainer's log), or nothing where it is not logged."""
    share = result.get("data_wait_share")
    return "" if share is None else f", {100 * share:.1f}% of the window waiting for data"


def _data_notes(report: Report, encoder: str, result: dict, ref: dict | None, compute: dict, workers: int) -> None:
    """The data path alone (a verdict against the reference's) and where one worker's time goes."""
    rate = result["data_only_images_per_s"]
    if ref is not None:
        report.verdict(f"data_path_{encoder}", rate / ref["data_only_images_per_s"], f"{rate:.0f} img/s",
                       f"{ref['data_only_images_per_s']:.0f} img/s")
    report.notes.append(
        f"{encoder} data path alone ({result['data_path']}, {max(workers, 1)} process(es)): {rate:.0f} img/s over "
        f"{result['data_only_timed_batches']} batches after the first {result['data_only_skipped_batches']}; "
        + worker_cost.describe(result["worker_cost"], workers, compute["images_per_s"]))


def _folder_report(report: Report, encoder: str, settings: dict, folder: tuple[dict, dict], listed: tuple[dict, dict],
                   compute: dict, flops) -> None:
    """The ImageFolder run's row, and its overall rate against the list run's (issue 14: within 5%)."""
    (job, result), (_, list_result) = folder, listed
    ratio = result["overall_images_per_s"] / list_result["overall_images_per_s"]
    per_epoch = trainer.folder_batches_per_epoch(job["folder_images"], job["batch"])
    report.add("pretrain", f"{encoder}/trainer_folder",
               {**settings, **flops(result, "overall_images_per_s"), "steps": job["steps"],
                "data": f"ssl_colorize.pretrain.main on an ImageFolder of {job['folder_images']} JPEGs (one class)",
                "folder_images": job["folder_images"], "steps_per_epoch": per_epoch,
                "epoch_boundaries": result["epoch_boundaries"], "overall_images_per_s": result["overall_images_per_s"],
                "median_images_per_s": result["images_per_s"], "list_overall_images_per_s": list_result["overall_images_per_s"],
                "vs_list": ratio, "vs_compute": result["overall_images_per_s"] / compute["images_per_s"],
                "log_every": result["log_every"]},
               {**result, "images_per_s": result["overall_images_per_s"],  # the window's images over its time
                "ms_per_step": 1e3 * job["batch"] / result["overall_images_per_s"]})
    met = ratio >= TARGETS["epoch_boundary"]
    report.notes.append(
        f"{encoder} trainer_folder: an ImageFolder of {job['folder_images']} JPEGs ({per_epoch} steps per epoch), "
        f"{result['epoch_boundaries']} epoch boundaries in the {job['steps']}-step window: "
        f"{result['overall_images_per_s']:.1f} img/s overall (median of records {result['images_per_s']:.1f}), the list "
        f"run {list_result['overall_images_per_s']:.1f} ({list_result['images_per_s']:.1f}): {ratio:.3f}x "
        f"[target: within {100 * (1 - TARGETS['epoch_boundary']):.0f}% of the list run: {'met' if met else 'not met'}]")
    report.verdict(f"epoch_boundary_{encoder}", ratio, f"{result['overall_images_per_s']:.1f} img/s on an ImageFolder",
                   f"{list_result['overall_images_per_s']:.1f} img/s on the list", TARGETS["epoch_boundary"])

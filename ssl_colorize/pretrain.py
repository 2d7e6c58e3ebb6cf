"""Cross-channel colorization pretraining: ``python -m ssl_colorize.pretrain``.

L in, a distribution over the 313 ab bins out, soft targets, class rebalancing (docs/protocols.md sections
2 and 3). Reads top to bottom as a recipe: options -> data -> run folder -> model -> optimizer -> loop.
The solver comes from the encoder's card (``get_card(name).pretrain``; ``.pretrain_builtin`` without
``--data``). Every ``--ckpt-every`` steps the run folder gets a rolling ``checkpoint.pth`` (everything
needed to resume bit-for-bit: weights, optimizer, scheduler, step, RNG and data position) and a preview
PNG of held-out images; every ``--snapshot-every`` steps a snapshot ``snapshots/step_XXXXXXX.pth``.

With no ``--data`` it trains on the built-in default (ssl_colorize.data.builtin) with a schedule
scaled down to finish in a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn

from ssl_colorize import distributed as dist_env
from ssl_colorize.checkpoint import CHECKPOINT_VERSION
from ssl_colorize.data.fast_path import DATA_PATHS, TargetSpec, default_workers, resolve_data_path
from ssl_colorize.data.loader import HAND_OFFS, TARGETS_ON, PretrainLoader
from ssl_colorize.data.transforms import RESIZE_MODES
from ssl_colorize.engine.cli import (
    ArgumentParser, UsageError, check_input_file, check_input_path, check_number, check_output_file, check_tensorboard,
    fail, run_cli,
)
from ssl_colorize.engine.run import RunFolder, add_run_args, check_run_folder, rng_state, seed_everything, set_rng_state
from ssl_colorize.losses import REDUCTIONS
from ssl_colorize.models import create_model
from ssl_colorize.models.cards import pretrainable_models
from ssl_colorize.targets import (
    DEFAULT_K, DEFAULT_LAMBDA, DEFAULT_SIGMA, DEFAULT_TEMPERATURE, bin_centers, load_prior, rebalance_weights,
)
from ssl_colorize.training.pretext import (
    COMPILE_MODES, LossGridLogits, ResumableSampler, UnreadableGuard, build_data, check_some_file_reads,
    class_prior, compute_loss, kmeans_warm_start, load_previews, lr_at, make_adam, resolve_config,
    resolve_device, set_batchnorm_momentum_, write_preview,
)
from ssl_colorize.training.checkpoint_writer import CHECKPOINT_IO, CheckpointWriter
from ssl_colorize.training.profile import PROFILER_WARMUP, SKIP_STEPS, StepProfiler
from ssl_colorize.training.progress import MEASURED_STEPS, WARMUP_STEPS, Progress, duration, next_steps

PRIOR_CHOICES = ("imagenet", "estimate")


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    p = ArgumentParser("ssl_colorize.pretrain", description=__doc__.split("\n\n")[0], add_help=add_help)
    p.add_argument("--encoder", default="alexnet_lab", choices=pretrainable_models(), help="the encoder to train")
    p.add_argument("--data", default=None,
                   help="an ImageFolder root (e.g. ImageNet's train/) or a text file listing image paths; "
                        "omitted: the built-in default")
    p.add_argument("--loss", default="rebalanced", choices=["rebalanced", "plain", "l2"],
                   help="classification with class rebalancing (the paper's full method), without it, or L2 regression")
    p.add_argument("--steps", type=int, default=None, help="iterations (default: the encoder's recipe)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size, split over the processes")
    p.add_argument("--crop", type=int, default=None, help="random square crop size")
    p.add_argument("--resize", type=int, default=None, help="resize first, as --resize-mode says (0: no resize)")
    p.add_argument("--resize-mode", default=None, choices=RESIZE_MODES,
                   help="squash: both sides to --resize, aspect not kept (the released 256x256 LMDB; default of "
                        "the paper recipes); shorter: the shorter side (default of the built-in recipe)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate")
    p.add_argument("--lr-steps", default=None, help="comma list of steps where the lr drops (default: recipe)")
    p.add_argument("--lr-factors", default=None, help="comma list of lr multipliers, one per --lr-steps entry")
    p.add_argument("--betas", default=None, help="Adam betas, e.g. 0.9,0.999")
    p.add_argument("--weight-decay", type=float, default=None, help="Adam's L2 weight decay (not AdamW)")
    p.add_argument("--bias-lr-mult", type=float, default=None,
                   help="the biases' lr multiplier (Caffe's lr_mult; AlexNet-Lab's released 2, colornet's 1)")
    p.add_argument("--bias-decay-mult", type=float, default=None,
                   help="the biases' weight-decay multiplier (Caffe's decay_mult; AlexNet-Lab's released 0, "
                        "colornet's 1); --bias-lr-mult 1 --bias-decay-mult 1: PyTorch's plain Adam")
    p.add_argument("--bn-momentum", type=float, default=None,
                   help="BatchNorm running-average momentum (paper recipes: 0.001, Caffe's "
                        "moving_average_fraction 0.999; the built-in recipe: torch's 0.1)")
    p.add_argument("--loss-reduction", default=None, choices=REDUCTIONS,
                   help="mean: over the loss grid's pixels; sum: over each image's grid, mean over the images "
                        "(the released SoftmaxCrossEntropyLoss; colornet's default)")
    p.add_argument("--prior", default="imagenet",
                   help="'imagenet' (the shipped prior), 'estimate' (from --data), or a prior file")
    p.add_argument("--prior-images", type=int, default=2000, help="images read by --prior estimate")
    p.add_argument("--k", type=int, default=DEFAULT_K, help="neighbours in the soft encoding")
    p.add_argument("--sigma", type=float, default=DEFAULT_SIGMA, help="soft-encoding Gaussian sigma (ab units)")
    p.add_argument("--lam", type=float, default=DEFAULT_LAMBDA, help="rebalancing mix with the uniform distribution")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="annealed-mean T of the previews")
    p.add_argument("--init", default=None, choices=["default", "kmeans"],
                   help="kmeans: Kraehenbuehl et al.'s data-dependent initialisation (default of the AlexNet-Lab "
                        "and colornet paper recipes); default: the model's own init (default of the built-in one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"], help="auto: bf16 autocast on CUDA")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on CUDA)")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=("none",) + COMPILE_MODES,
                   help="torch.compile the model; a bare --compile is 'default', 'reduce-overhead' adds CUDA graphs, "
                        "'none' (the default) runs it eagerly")
    p.add_argument("--workers", type=int, default=None,
                   help="data-loading processes (default: the cores this process may use, less one, at most 8)")
    p.add_argument("--data-path", default="auto", choices=DATA_PATHS,
                   help="workers: CPU worker processes decode, crop and soft-encode; device: batched nvJPEG "
                        "decoding, crops, L and targets on the GPU; auto: workers when this process may use "
                        ">= 8 cores (or on a CPU), else device on a GPU with nvJPEG")
    p.add_argument("--targets-on", default="workers", choices=TARGETS_ON,
                   help="with --data-path workers: where ab on the loss grid and its soft encoding are computed: "
                        "workers (in the data workers, on the CPU) or device (on the training device, after "
                        "the copy; frees the workers' time on a GPU); the same values either way")
    p.add_argument("--hand-off", default="thread", choices=HAND_OFFS,
                   help="on CUDA, how a batch reaches the step: thread (a producer thread copies and finishes "
                        "batches on a side stream) or inline (the training thread itself, one batch ahead: no "
                        "second Python thread competing with the one launching the kernels)")
    p.add_argument("--profile", type=int, default=None, metavar="N",
                   help=f"record N steps with torch.profiler after {SKIP_STEPS} steps: <run folder>/profile/ gets "
                        "the Chrome trace, an op table and host/device time per step")
    p.add_argument("--ckpt-every", type=int, default=None, help="rolling checkpoint + preview every N steps")
    p.add_argument("--checkpoint-io", default="background", choices=CHECKPOINT_IO,
                   help="background: the loop copies the state to host memory and a thread writes the file while "
                        "training goes on (alexnet_lab's 0.7 GB took 2 s to write on a 2-core CPU); blocking: the "
                        "loop waits for the write")
    p.add_argument("--snapshot-every", type=int, default=None,
                   help="keep a snapshot every N steps (default: a third of the run; none for the built-in default)")
    p.add_argument("--log-every", type=int, default=10, help="log the mean loss and the rate every N steps")
    p.add_argument("--preview-count", type=int, default=8, help="held-out images in each preview PNG")
    p.add_argument("--stop-after", type=int, default=None,
                   help="leave after this step, as if killed (checkpoint written); for tests and time-sliced jobs")
    p.add_argument("--out-csv", default=None, help="append a final-loss result row to this CSV")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write loss, lr and rate to <run folder>/tensorboard (pip install tensorboard)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_run_args(p, "pretrain")
    p._option_string_actions["--out"].help = ("run folder (default: runs/pretrain-<encoder>[-<loss>][-builtin] "
                                              "in the current folder)")
    return p


def validate(args: argparse.Namespace) -> None:
    """Every check that needs no data read: options, input paths, the outputs (creates nothing)."""
    cfg = resolve_config(args)
    check_input_path("--data", args.data)
    if args.prior not in PRIOR_CHOICES:
        check_input_file("--prior", args.prior)
        try:
            load_prior(args.prior)  # a small CSV: read now, so that a malformed one stops the run here
        except ValueError as exc:
            raise fail("--prior", args.prior, str(exc)) from None
    check_output_file("--out-csv", args.out_csv)
    if args.profile is not None:
        check_number("--profile", args.profile, minimum=1)
        needed = SKIP_STEPS + PROFILER_WARMUP + args.profile
        run_steps = min(cfg["steps"], args.stop_after or cfg["steps"])
        if run_steps < needed:
            raise fail("--profile", args.profile, f"needs {needed} steps ({SKIP_STEPS} skipped, {PROFILER_WARMUP} "
                                                  f"warm-up, {args.profile} recorded); this run has {run_steps}")
    check_run_folder(cfg["out"], resume=args.resume, overwrite=args.overwrite)
    resolve_device(args.device)
    if args.tensorboard:
        check_tensorboard()


def main(args: argparse.Namespace) -> dict:
    cfg = resolve_config(args)
    env = dist_env.init_distributed()
    rank, world = env.rank, env.world_size
    main_process = rank == 0
    device = resolve_device(args.device, env.local_rank)
    if cfg["batch_size"] % world:
        raise fail("--batch-size", cfg["batch_size"], f"not divisible by the {world} processes")
    per_rank_batch = cfg["batch_size"] // world
    files, held_out = build_data(cfg)
    if len(files) < cfg["batch_size"]:
        raise fail("--batch-size", cfg["batch_size"], f"more than the {len(files)} training images")
    check_some_file_reads(files, cfg["data"] or "the built-in default")  # before anything is written
    try:
        data_path = resolve_data_path(args.data_path, device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    amp_dtype = torch.bfloat16 if (args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")) else None
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"

    # The run folder: opened (and with --overwrite cleaned) by the main process before the others look.
    if main_process:
        run = RunFolder.open(cfg["out"], job="pretrain", resume=args.resume, overwrite=args.overwrite,
                             run_id=args.run_id)
    dist_env.barrier()
    if not main_process:
        run = RunFolder(Path(cfg["out"]), args.run_id or Path(cfg["out"]).name, args.resume)
    out = run.path
    if main_process:
        run.write_config({**cfg, "world_size": world, "device": str(device), "data_path": data_path})

    seed_everything(cfg["seed"])
    model = create_model(cfg["encoder"], **({"out_channels": 2} if cfg["loss"] == "l2" else {})).to(device)
    set_batchnorm_momentum_(model, cfg["bn_momentum"])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    prior = class_prior(cfg, files, out, device, main_process=main_process, prior_images=args.prior_images,
                        progress=main_process and not args.no_progress)
    class_weights = rebalance_weights(prior, cfg["lam"]).to(device) if cfg["loss"] == "rebalanced" else None

    optimizer = make_adam(model, cfg["lr"], tuple(cfg["betas"]), cfg["weight_decay"], device,
                          bias_lr_mult=cfg["bias_lr_mult"], bias_decay_mult=cfg["bias_decay_mult"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg["lr"])
    step, epoch, batch_in_epoch, skipped_total = 0, 0, 0, 0
    skipped_names: list[str] = []

    # Resume from the run folder's rolling checkpoint (the main process also cuts log.jsonl back to it).
    if main_process:
        state = run.load_checkpoint()
    else:
        state = torch.load(run.checkpoint_path, map_location="cpu", weights_only=False) \
            if args.resume and run.checkpoint_path.is_file() else None
    if state is not None:
        if state["model"]["name"] != cfg["encoder"]:
            raise fail("--encoder", cfg["encoder"], f"{run.checkpoint_path} holds a {state['model']['name']!r}")
        model.load_state_dict(state["state_dict"])
        saved_groups = len(state["optimizer"]["param_groups"])
        if saved_groups != len(optimizer.param_groups):  # e.g. a run started before the bias groups existed
            raise fail("--resume", run.checkpoint_path,
                       f"its optimizer has {saved_groups} parameter group(s), this recipe makes "
                       f"{len(optimizer.param_groups)}; resume with the bias options it was started with "
                       "(--bias-lr-mult 1 --bias-decay-mult 1: one group)")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        epoch, batch_in_epoch = state["data_state"]["epoch"], state["data_state"]["batch_in_epoch"]
        skipped_total = state["data_state"].get("skipped", 0)
        set_rng_state(state["rng"])
    elif cfg["init"] == "kmeans":
        kmeans_warm_start(model, files, cfg, device, progress=main_process and not args.no_progress)

    core = model
    train_model: nn.Module = LossGridLogits(model)
    if world > 1:
        from ssl_colorize.sync_bn import convert_batchnorm

        # BatchNorm over the global batch: N processes then compute what one process would.
        train_model = convert_batchnorm(train_model, device)
        core = train_model.encoder
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile not in (None, "none"):
        train_model = torch.compile(train_model, mode=None if args.compile == "default" else args.compile)

    # One loader for the whole run: its sampler spans the epochs, so the worker processes start once.
    workers = args.workers if args.workers is not None else default_workers()
    sampler = ResumableSampler(len(files), per_rank_batch, cfg["seed"], rank, world, endless=True)
    sampler.set_position(epoch, batch_in_epoch)
    loader = PretrainLoader(files, sampler, per_rank_batch, cfg["crop"], cfg["resize"], device, data_path,
                            workers=workers, channels_last=channels_last,
                            targets=TargetSpec(model.output_stride, cfg["k"], cfg["sigma"], encode=cfg["loss"] != "l2"),
                            resize_mode=cfg["resize_mode"], targets_on=args.targets_on, hand_off=args.hand_off)
    previews = (load_previews(held_out, cfg["crop"], cfg["resize"], args.preview_count, cfg["resize_mode"])
                if main_process else None)
    guard = UnreadableGuard(cfg["data"] or "the built-in default", len(files))

    stop_at = min(cfg["steps"], args.stop_after) if args.stop_after is not None else cfg["steps"]
    profiler = StepProfiler(out / "profile", args.profile if main_process else None, device)
    progress = Progress(step, stop_at, cfg["steps"], show_bar=not args.no_progress, main_process=main_process,
                        tensorboard_dir=out / "tensorboard" if args.tensorboard else None)
    progress.say(f"pretrain: {cfg['encoder']} on {'the built-in default' if cfg['builtin'] else cfg['data']} "
                 f"({len(files)} images), {cfg['steps']} steps of {cfg['batch_size']} x {cfg['crop']}px, "
                 f"loss {cfg['loss']} ({cfg['loss_reduction']}), init {cfg['init']}, device {device}, "
                 f"{world} process(es), run folder {out}"
                 + (f", resuming at step {step}" if step else "")
                 + f"; the time it takes is printed after the first {WARMUP_STEPS + MEASURED_STEPS} steps")

    def checkpoint_dict() -> dict:
        return {
            "model": model.model_spec, "state_dict": core.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "rng": rng_state(),
            "data_state": {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "skipped": skipped_total},
            "config": cfg, "bins": bin_centers(), "prior": prior.cpu(), "version": CHECKPOINT_VERSION,
        }

    checkpoints = CheckpointWriter(background=args.checkpoint_io == "background")

    def save_all() -> None:
        if not main_process:
            return
        every = cfg["snapshot_every"]
        snapshot = every is not None and (step == cfg["steps"] or step % every == 0)
        checkpoints.save(checkpoint_dict(), run.checkpoint_path,
                         copies=[out / "snapshots" / f"step_{step:07d}.pth"] if snapshot else [])
        if previews is not None:
            write_preview(core, previews.to(device), out / f"preview_step{step:07d}.png", cfg["temperature"])

    train_model.train()
    last_time, images_since, last_wait = time.perf_counter(), 0, 0.0
    last_loss = float("nan")
    # The logged loss is the mean over the steps since the last log line (summed on the device, read
    # once per line: no per-step host sync).
    loss_sum, loss_steps = torch.zeros((), device=device), 0
    batches = iter(loader)
    finished = False
    try:
        while step < stop_at:
            with profiler.region("data"):
                batch = next(batches)
            batch_in_epoch += 1
            if batch_in_epoch == sampler.batches_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            if batch.skipped:
                skipped_total += len(batch.skipped)
                skipped_names.extend(batch.skipped)
                for name in batch.skipped:
                    progress.say(f"pretrain: skipped unreadable image {name}", err=True)
            guard.update(batch.skipped, batch.images.shape[0])
            if batch.images.shape[0] == 0:
                continue
            with profiler.region("forward+loss"):
                loss = compute_loss(train_model, batch.L, batch.ab, cfg, class_weights, amp_dtype, encoded=batch.encoded)
            with profiler.region("backward"):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with profiler.region("optimizer"):
                optimizer.step()
                scheduler.step()
            step += 1
            images_since += batch.images.shape[0] * world
            with profiler.region("bookkeeping"):
                loss_sum += loss.detach().float()
                loss_steps += 1
                progress.step(step)
            profiler.step()
            if step % args.log_every == 0 or step == stop_at:
                if world > 1:
                    torch.distributed.all_reduce(loss_sum)
                    loss_sum /= world
                last_loss = float(loss_sum) / loss_steps
                loss_sum.zero_()
                steps_logged, loss_steps = loss_steps, 0
                now = time.perf_counter()
                # data_wait_ms: the time per step the loop waited for its next batch (a data-bound run
                # shows it near the step time, a compute-bound one near 0).
                record = {"step": step, "loss": last_loss, "lr": optimizer.param_groups[0]["lr"],
                          "images_per_sec": images_since / (now - last_time),
                          "data_wait_ms": 1e3 * (loader.wait_seconds - last_wait) / steps_logged,
                          "skipped": skipped_total, "epoch": epoch, "time": time.time()}
                last_time, images_since, last_wait = now, 0, loader.wait_seconds
                progress.scalars(step, record)
                if main_process:
                    run.log(record)
            if step % cfg["ckpt_every"] == 0 or step == stop_at:
                with profiler.region("checkpoint"):
                    save_all()
        finished = True
    finally:
        batches.close()  # ends the loader's worker processes
        # The last checkpoint is on disk before the run says so (or, after an error, before it propagates).
        checkpoints.close(raise_error=finished)
        profile_line = profiler.close()
        seconds = progress.close()
    if profile_line:
        progress.say(profile_line)
    if skipped_total:
        progress.say(f"pretrain: {skipped_total} unreadable image(s) were skipped"
                     + (f", e.g. {', '.join(skipped_names[:5])}" if skipped_names else ""), err=True)
    if step >= cfg["steps"]:
        progress.say(f"pretrain: done in {duration(seconds)}: checkpoint {run.checkpoint_path}\nnext:\n  "
                     + "\n  ".join(next_steps(run.checkpoint_path)))
    else:
        progress.say(f"pretrain: stopped at step {step} of {cfg['steps']}: checkpoint {run.checkpoint_path}; "
                     f"the same command with --resume continues it")
    if main_process and step >= cfg["steps"] and args.out_csv:
        from ssl_colorize.results import append_rows, make_row

        append_rows(args.out_csv, [make_row(
            run_id=run.run_id, benchmark="pretrain", checkpoint=str(run.checkpoint_path),
            encoder=cfg["encoder"], tap="-", dataset="builtin" if cfg["builtin"] else str(cfg["data"]),
            split="train", protocol=f"colorization-{cfg['loss']}", metric="final_loss", value=last_loss,
            seed=cfg["seed"], hparams={k: cfg[k] for k in ("steps", "batch_size", "crop", "lr", "loss", "loss_reduction",
                                                           "init", "resize_mode")})])
    dist_env.barrier()
    return {"step": step, "loss": last_loss, "out": str(out), "skipped": skipped_total}


def cli(argv: list[str] | None = None):
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    cli()

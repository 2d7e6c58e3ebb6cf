"""Colorization quality, the paper's Table 1 (docs/protocols.md section 6): AuC, rebalanced AuC, colourfulness,
semantic interpretability, and the annealing-temperature sweep.

    python -m ssl_colorize.benchmarks.colorization_quality --checkpoint runs/pretrain-alexnet_lab-builtin
    python -m ssl_colorize.benchmarks.colorization_quality --checkpoint A.pth B.pth --data /imagenet/val \
        --limit 10000 --classifier vgg16 --classifier-weights vgg16-397923af.pth

Recipe, for every image of ``--data`` (default: the built-in photographs) in a seeded random order:
resize the shorter side to ``--size``, centre-crop ``--crop``, convert to Lab; score the baselines
(ground truth, grey, random colours) and each checkpoint on the same pixels (:mod:`ssl_colorize.quality`).

Classifier rows (``--classifier-weights``, a local state_dict; nothing is downloaded): accuracy
against ImageNet labels when the data is an ImageFolder of synset folders (``--class-index`` gives the
classifier's order), else top-1 agreement with the original colour image (protocol column says which).

Bad input: unreadable files are skipped and counted; images smaller than ``--size`` are upscaled
(``--small-images upscale``) or skipped; grey images are skipped (``--keep-grey`` keeps them); a
folder with no colour image at all is an error naming it.

Outputs (under the current folder by default): rows in ``--out-csv`` (benchmark
``colorization_quality``; metrics ``auc_raw``, ``auc_rebalanced``, ``colourfulness``,
``<classifier>_top1``; the sweep's rows have protocol ``temperature_sweep:T=<T>``), ``examples.png``
and ``temperature_sweep.png`` in ``--out``, and the Table-1 view beside the published numbers.
"""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_colorize.checkpoint_ref import parse_checkpoint_ref
from ssl_colorize.color import rgb_to_lab
from ssl_colorize.data import ImageFiles
from ssl_colorize.engine.cli import (
    ArgumentParser, UsageError, check_device, check_input_file, check_input_path, check_non_negative, check_number,
    check_output_dir, check_output_file, check_positive, fail, run_cli,
)
from ssl_colorize.inference import load_colorizer
from ssl_colorize.quality import (
    BENCHMARK, BUILTIN_PHOTOS, BUILTIN_SHAPES, CropCollate, Evaluation, LoadReport, build_rows, classifier_outputs,
    label_mapping, load_classifier, resolve_data,
)
from ssl_colorize.quality_plots import save_examples, save_sweep_plot
from ssl_colorize.quality_table import format_quality_table
from ssl_colorize.results import append_rows, load_published, make_row
from ssl_colorize.targets import DEFAULT_TEMPERATURE, grey_mask, load_prior

DEFAULT_TEMPERATURES = "0.01,0.05,0.1,0.2,0.3,0.38,0.5,0.7,1.0"
FIGURES = ("examples.png", "temperature_sweep.png")


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    p = ArgumentParser(
        "colorization_quality", add_help=add_help,
        description="Colorization quality (paper Table 1): raw / rebalanced AuC, colourfulness, classifier "
        "top-1 on recolorized images, the annealing-temperature sweep, and the baselines on the same images.",
    )
    p.add_argument("--checkpoint", nargs="+", action="extend", default=[],
                   help="checkpoint file(s) or run folder(s); 'random:ENCODER' for a seeded random init. "
                   "Without any, only the baselines are scored.")
    p.add_argument("--data", default=None,
                   help=f"an image folder (ImageFolder root or flat) or list file; default '{BUILTIN_PHOTOS}' "
                   f"(the real photographs shipped with scikit-image / scikit-learn); '{BUILTIN_SHAPES}' is the "
                   "coloured-shapes val split (128 px: use --size 128 --crop 128)")
    p.add_argument("--size", type=int, default=256, help="resize the shorter side to this")
    p.add_argument("--crop", type=int, default=None, help="centre crop (default: --size, a square of it)")
    p.add_argument("--small-images", choices=("upscale", "skip"), default="upscale",
                   help="images whose shorter side is below --size: upscale them or skip them")
    p.add_argument("--keep-grey", action="store_true",
                   help="score grey images too (default: skip and count them: they have no colour to score)")
    p.add_argument("--limit", type=int, default=None, help="score at most this many images (the paper: 10000)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help="annealed-mean temperature of the main rows (0.38 is the paper's)")
    p.add_argument("--temperatures", default=DEFAULT_TEMPERATURES,
                   help="comma-separated temperatures of the sweep; 'none' skips it")
    p.add_argument("--prior", default=None, help="prior for the rebalanced AuC (default: the shipped ImageNet prior)")
    p.add_argument("--classifier", default="vgg16", help="a torchvision classifier name (vgg16 is the paper's)")
    p.add_argument("--classifier-weights", default=None,
                   help="a local state_dict file for --classifier; without it the classifier rows are skipped")
    p.add_argument("--classifier-size", type=int, default=224, help="classifier input size")
    p.add_argument("--class-index", default=None,
                   help="text file of ImageNet synset ids, one per line, in the classifier's output order")
    p.add_argument("--num-examples", type=int, default=6, help="rows of the example grid PNG")
    p.add_argument("--out", default=None, help="folder for the PNGs (default runs/colorization_quality/RUN_ID)")
    p.add_argument("--out-csv", default="results/colorization_quality.csv", help="results table to append rows to")
    p.add_argument("--published", default=None,
                   help="published numbers shown beside ours (default: the package's table; 'none' hides them)")
    p.add_argument("--run-id", default=None, help="run id of the rows (default: a timestamp)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image order (random-colour donors) and random inits")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    return p


def parse_temperatures(text: str) -> list[float]:
    """``"0.1,1"`` -> [0.1, 1.0] (sorted, unique); 'none' -> []; UsageError naming --temperatures."""
    if text is None or text.strip().lower() in ("", "none"):
        return []
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise fail("--temperatures", text, "must be comma-separated numbers") from exc
    if not all(t > 0 and t != float("inf") for t in values):
        raise fail("--temperatures", text, "every temperature must be > 0")
    return sorted(set(values))


def validate(args) -> None:
    check_number("--size", args.size, minimum=8)
    check_number("--crop", args.crop, minimum=8)
    if args.crop is not None and args.crop > args.size:
        raise fail("--crop", args.crop, f"larger than --size {args.size} (the shorter side after resizing)")
    check_positive("--temperature", args.temperature)
    parse_temperatures(args.temperatures)
    check_number("--limit", args.limit, minimum=1)
    check_non_negative("--num-examples", args.num_examples)
    check_positive("--batch-size", args.batch_size)
    check_non_negative("--workers", args.workers)
    check_positive("--classifier-size", args.classifier_size)
    for spec in args.checkpoint:
        if parse_checkpoint_ref(spec).is_random and ":" not in spec:
            raise fail("--checkpoint", spec, "name the encoder: random:ENCODER")
    if args.data not in (None, BUILTIN_PHOTOS, BUILTIN_SHAPES):
        check_input_path("--data", args.data)
    check_input_file("--prior", args.prior)
    check_input_file("--classifier-weights", args.classifier_weights)
    check_input_file("--class-index", args.class_index)
    if args.published is not None and args.published.lower() != "none":
        check_input_file("--published", args.published)
    check_device("--device", args.device)
    # Every output, before anything is loaded (an unwritable --out-csv used to fail after the whole run).
    check_output_file("--out-csv", args.out_csv)
    out = Path(args.out) if args.out else Path("runs") / BENCHMARK
    check_output_dir("--out", out)
    for name in FIGURES:
        check_output_file("--out", out / name)


def main(args) -> list[dict]:
    crop = args.crop or args.size
    temperatures = parse_temperatures(args.temperatures)
    run_id = args.run_id or "cq-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    source, dataset_name = resolve_data(args.data)
    try:
        dataset = ImageFiles(source)
        published = None if (args.published or "").lower() == "none" else load_published(args.published)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    out_dir = Path(args.out) if args.out else Path.cwd() / "runs" / BENCHMARK / run_id
    out_dir.mkdir(parents=True, exist_ok=True)

    try:
        colorizers = [load_colorizer(spec, args.seed, device) for spec in args.checkpoint]
    except ValueError as exc:  # a file that is not a colorization checkpoint
        raise UsageError(f"--checkpoint: {exc}") from exc
    seen: dict[str, int] = {}
    for c in colorizers:  # plots and tables key on the label: make every label unique
        seen[c.label] = seen.get(c.label, 0) + 1
        if seen[c.label] > 1:
            c.label = f"{c.label} #{seen[c.label]}"
    if not colorizers:
        print("no --checkpoint given: scoring the baselines only", file=sys.stderr)
    prior = load_prior(args.prior, device=device)

    classifier, labels_map, classifier_protocol = None, None, None
    if args.classifier_weights:
        try:
            classifier = load_classifier(args.classifier, args.classifier_weights, device)
            labels_map, classifier_protocol = label_mapping(dataset, classifier_outputs(classifier), args.class_index)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    else:
        print(f"no --classifier-weights: skipping the semantic-interpretability rows ({args.classifier} top-1); "
              "pass a local state_dict file to score them (nothing is downloaded)", file=sys.stderr)

    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed)).tolist()
    order = order[: args.limit] if args.limit is not None else order
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=order, num_workers=args.workers,
                        collate_fn=CropCollate(dataset, args.size, crop, skip_small=args.small_images == "skip"))
    report = LoadReport()
    evaluation = Evaluation(colorizers, prior, device, args.temperature, temperatures, args.num_examples,
                            classifier, labels_map, args.classifier_size)
    with tqdm(total=len(order), desc="colorization quality", unit="img", dynamic_ncols=True) as bar:
        for images, labels, paths, unreadable, small in loader:
            bar.update(images.shape[0] + len(unreadable) + (len(small) if args.small_images == "skip" else 0))
            report.unreadable += unreadable
            report.small += small
            if images.shape[0] and not args.keep_grey:
                grey = grey_mask(rgb_to_lab(images.float() / 255.0, validate=False)[:, 1:])
                report.grey += [p for p, g in zip(paths, grey.tolist()) if g]
                images, labels = images[~grey], labels[~grey]
            if images.shape[0]:
                evaluation.add_batch(images, labels)
    has_random = evaluation.finish()
    report.print(source, args.size, args.small_images)
    if evaluation.images == 0:
        if report.grey:
            raise UsageError(f"no colour to score in {source}: all {len(report.grey)} readable images are greyscale "
                             "(no pixel with |a| or |b| above 5); give a folder of colour photographs")
        raise UsageError(f"no readable image to score in {source} ({len(report.unreadable)} unreadable, "
                         f"{len(report.small)} smaller than --size {args.size} skipped)")
    if not has_random:
        print("only one colour image: the random-colours baseline needs two and is skipped", file=sys.stderr)

    common = {"crop": crop, "size": args.size, "small_images": args.small_images,
              "prior": args.prior or "imagenet (shipped)"}
    classifier_extra = {"classifier": args.classifier, "classifier_weights": args.classifier_weights,
                        "classifier_size": args.classifier_size}
    rows = build_rows(evaluation, report, run_id=run_id, seed=args.seed, dataset=dataset_name, common=common,
                      classifier=args.classifier, classifier_protocol=classifier_protocol,
                      classifier_extra=classifier_extra, has_random=has_random)
    append_rows(args.out_csv, [make_row(**r) for r in rows])
    written = []
    if evaluation.examples:
        written.append(save_examples(evaluation.examples, [c.label for c in colorizers], out_dir / FIGURES[0]))
    sweep = evaluation.sweep_results()
    if sweep and temperatures:
        baselines = {name: evaluation.main[name].result() for name in ("grey", "ground_truth")}
        written.append(save_sweep_plot(sweep, baselines, args.temperature, out_dir / FIGURES[1]))
    for spec in sorted(evaluation.sweep_skipped):
        print(f"{spec}: a 2-channel (L2) head predicts ab directly: no temperature sweep", file=sys.stderr)
    print(format_quality_table(rows, published))
    print(f"{len(rows)} rows -> {args.out_csv}; figures: {', '.join(str(p) for p in written) or 'none'}")
    return rows


def cli(argv=None) -> list[dict]:
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    cli()

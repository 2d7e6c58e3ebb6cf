"""The linear probe's training loop with an exact resume (docs/protocols.md section 4; run contract:
ssl_colorize/engine/run.py).

:class:`ProbeTraining` trains the heads of a :class:`~ssl_colorize.heads.probe.MultiTapProbe` with SGD
on the sum of the taps' losses, lr x0.1 at each milestone, and keeps in the run folder

* ``checkpoint.pth``: heads, optimizer and the position in the data (epoch, batch, iteration), saved
  every few minutes, every ``save_every_iters`` iterations and at each epoch's end; the crops and the
  order of an epoch depend only on (seed, epoch, index), so a resumed run sees exactly the batches the
  uninterrupted run saw and ends with the same tensors;
* ``log.jsonl``: a record every ``log_every`` iterations (lr, each tap's batch loss) and one per epoch
  (training loss and accuracy, validation top-1 / top-5, files skipped);
* ``tensorboard/`` (optional): the same scalars.

Unreadable files are skipped, counted and named: the first few on the console, all in the log.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_colorize.engine.cli import UsageError
from ssl_colorize.engine.probe_settings import BENCHMARK, RESUME_KEYS
from ssl_colorize.engine.run import RunFolder, describe
from ssl_colorize.heads.probe import EpochSampler, FrozenEncoderGuard, MultiTapProbe, evaluate

STATE_VERSION = 2
#: How many unreadable files a console line names (the log and summary name them all).
NAMED_ON_CONSOLE = 3


def format_lr(lr: float) -> str:
    """``1e-04``, ``2.5e-03``: a learning rate without float noise (0.1 ** k leaves 1.0000000000000002)."""
    mantissa, exponent = f"{lr:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def clean_lr(lr: float) -> float:
    """The lr as it is logged: 6 significant digits (0.00010000000000000002 -> 0.0001)."""
    return float(f"{lr:.6g}")


def comparable(settings: dict) -> dict:
    return {key: settings[key] for key in RESUME_KEYS}


class ProbeTraining:
    """One probe run in a :class:`RunFolder`: fresh, or resumed from its rolling checkpoint."""

    def __init__(self, probe: MultiTapProbe, settings: dict, run: RunFolder, train_set, val_set, *,
                 save_every_minutes: float = 10.0, save_every_iters: int = 0, log_every: int = 20,
                 tensorboard: bool = False, run_id_given: str | None = None) -> None:
        self.probe, self.settings, self.run = probe, settings, run
        self.train_set, self.val_set = train_set, val_set
        self.taps = list(probe.taps)
        self.device = torch.device(settings["device"])
        self.save_every_seconds = 60.0 * save_every_minutes
        self.save_every_iters = save_every_iters
        self.log_every = log_every
        self.guard = FrozenEncoderGuard(probe.encoder)
        self.optimizer = torch.optim.SGD(
            probe.parameter_groups(settings["wd"]), lr=settings["lr"], momentum=settings["momentum"],
            nesterov=settings["nesterov"],
        )
        batches = len(train_set) // settings["batch_size"]
        if settings["max_train_batches"]:
            batches = min(batches, settings["max_train_batches"])
        self.batches_per_epoch = batches
        self.total_iters = batches * settings["epochs"]
        self.milestones = [round(step * batches) for step in settings["lr_steps"]]
        self.state = {
            "kind": BENCHMARK, "version": STATE_VERSION, "config": comparable(settings), "run_id": run.run_id,
            "encoder_fingerprint": self.guard.fingerprint(), "epoch": 0, "batch_in_epoch": 0, "step": 0,
            "accum": None, "history": [], "final": None, "elapsed": 0.0, "skipped": [],
        }
        self.resumed = self._resume(run_id_given)
        self.writer = self._tensorboard() if tensorboard else None

    # -- resume ---------------------------------------------------------------------------------

    def _resume(self, run_id_given: str | None) -> bool:
        saved = self.run.load_checkpoint()  # None on a fresh start; the log is cut back to its step
        if saved is None:
            return False
        path = self.run.checkpoint_path
        if saved.get("kind") != BENCHMARK or saved.get("version") != STATE_VERSION:
            raise UsageError(f"--resume: {path} is not a linear-probe checkpoint of this version; use --overwrite")
        before = saved["config"]
        differ = {k: (before.get(k), v) for k, v in self.state["config"].items() if before.get(k) != v}
        if differ:
            detail = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differ.items())
            raise UsageError(f"--resume {self.run.path}: settings differ ({detail}); use --overwrite or another --out")
        if saved["encoder_fingerprint"] != self.state["encoder_fingerprint"]:
            raise UsageError(f"--resume {self.run.path}: the encoder's weights differ from those it was trained on")
        if run_id_given is not None and run_id_given != saved["run_id"]:
            raise UsageError(f"--run-id {run_id_given}: {self.run.path} holds run {saved['run_id']!r}")
        self.probe.heads.load_state_dict(saved["heads"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.state.update({k: saved[k] for k in self.state if k in saved and k != "config"})
        self.run.run_id = self.state["run_id"]
        print(f"resuming {self.state['run_id']} from {path}: epoch {self.state['epoch']}, batch "
              f"{self.state['batch_in_epoch']}, iteration {self.state['step']}/{self.total_iters}", flush=True)
        return True

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter  # optional dependency, checked by validate()

        # purge_step: a resumed run drops the events written after its checkpoint, as log.jsonl does.
        return SummaryWriter(str(self.run.path / "tensorboard"), purge_step=self.state["step"] + 1)

    def save(self) -> None:
        self.run.save_checkpoint({**self.state, "heads": self.probe.heads.state_dict(),
                                  "optimizer": self.optimizer.state_dict(), "settings": self.settings})

    # -- logging --------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        self.run.log(record)
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "kind", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def note_skipped(self, paths: list[str], where: str, step: int) -> None:
        """Count and name unreadable files: all in the state, the summary and the log, a few on screen.

        ``step``: the iteration the files belong to, so that a resume cuts the record with the iteration.
        """
        new = [p for p in dict.fromkeys(paths) if p not in self.state["skipped"]]
        if not new:
            return
        self.state["skipped"].extend(new)
        self.run.log({"step": step, "kind": "skipped", "where": where, "files": new})
        print(f"{where}: skipped {len(new)} unreadable file(s): {describe(new, NAMED_ON_CONSOLE)}",
              file=sys.stderr, flush=True)

    def lr_at(self, iteration: int) -> float:
        """lr x0.1 at each milestone passed (per iteration, so resumption needs no scheduler state)."""
        return self.settings["lr"] * 0.1 ** sum(iteration >= m for m in self.milestones)

    # -- the loop -------------------------------------------------------------------------------

    def fit(self, loader_kw: dict) -> dict:
        """Train to the end of the schedule (or continue to it); returns the final validation metrics."""
        s, state, probe = self.settings, self.state, self.probe
        val_loader = DataLoader(self.val_set, batch_size=s["batch_size"], shuffle=False, **loader_kw)
        last_save = time.monotonic()
        segment_start = time.monotonic()
        while state["final"] is None and state["epoch"] < s["epochs"]:
            epoch = state["epoch"]
            if state["accum"] is None:
                state["accum"] = {"seen": 0, "loss": {t: 0.0 for t in self.taps}, "correct": {t: 0 for t in self.taps}}
            accum = state["accum"]
            self.train_set.set_epoch(epoch)
            start = state["batch_in_epoch"] * s["batch_size"]
            sampler = EpochSampler(len(self.train_set), s["seed"], epoch, start=start)
            loader = DataLoader(self.train_set, batch_size=s["batch_size"], sampler=sampler, drop_last=True,
                                **loader_kw)
            probe.train()
            progress = tqdm(total=self.batches_per_epoch - state["batch_in_epoch"], unit="batch", leave=False,
                            desc=f"epoch {epoch + 1}/{s['epochs']}",
                            mininterval=0.1 if sys.stderr.isatty() else 30.0)  # keep batch logs (SLURM) short
            for batch in loader:
                if state["batch_in_epoch"] >= self.batches_per_epoch:
                    break
                lr = self.lr_at(state["step"])
                for group in self.optimizer.param_groups:  # biases at lr x2 (MultiTapProbe.parameter_groups)
                    group["lr"] = lr * group.get("lr_mult", 1.0)
                self.note_skipped(batch.skipped, f"epoch {epoch + 1}", state["step"] + 1)
                stats = None
                if batch.labels.numel() >= 2:  # a batch emptied by undecodable files is skipped, not fatal
                    labels = batch.labels.to(self.device, non_blocking=True)
                    stats = probe.training_step(batch.images.to(self.device, non_blocking=True), labels, self.optimizer)
                    n = labels.numel()
                    accum["seen"] += n
                    for tap in self.taps:
                        accum["loss"][tap] += stats[tap]["loss"] * n
                        accum["correct"][tap] += stats[tap]["correct"]
                state["batch_in_epoch"] += 1
                state["step"] += 1
                if stats is not None and self.log_every and state["step"] % self.log_every == 0:
                    self.log({"step": state["step"], "kind": "train", "epoch": epoch + 1, "lr": clean_lr(lr),
                              **{f"loss_{t}": round(stats[t]["loss"], 5) for t in self.taps}})
                progress.update(1)
                mean_loss = sum(accum["loss"].values()) / max(1, accum["seen"])
                progress.set_postfix(lr=format_lr(lr), loss=f"{mean_loss:.3f}")
                due_time = time.monotonic() - last_save > self.save_every_seconds
                due_iter = self.save_every_iters and state["step"] % self.save_every_iters == 0
                # The epoch's last iteration is saved after its epoch record: a checkpoint never shares
                # a step with a record written after it (a resume would then write that record twice).
                epoch_end = state["batch_in_epoch"] == self.batches_per_epoch
                if (due_time or due_iter) and not epoch_end:
                    state["elapsed"] += time.monotonic() - segment_start
                    segment_start = time.monotonic()
                    self.save()
                    last_save = time.monotonic()
            progress.close()

            self.guard.check()  # fail early: a changed encoder voids everything after it
            last = epoch + 1 == s["epochs"]
            row = {"step": state["step"], "kind": "epoch", "epoch": epoch + 1,
                   "lr": clean_lr(self.lr_at(max(0, state["step"] - 1)))}
            seen = max(1, accum["seen"])
            for tap in self.taps:
                row[f"train_loss_{tap}"] = round(accum["loss"][tap] / seen, 5)
                row[f"train_top1_{tap}"] = round(100.0 * accum["correct"][tap] / seen, 3)
            metrics = None
            if last or (s["eval_every"] and (epoch + 1) % s["eval_every"] == 0):
                metrics = self.evaluate(val_loader)
                for tap in self.taps:
                    row[f"val_top1_{tap}"] = round(metrics[tap]["top1"], 3)
                    row[f"val_top5_{tap}"] = round(metrics[tap]["top5"], 3)
            row["skipped_files"] = len(state["skipped"])
            state["elapsed"] += time.monotonic() - segment_start
            segment_start = time.monotonic()
            row["elapsed_s"] = round(state["elapsed"], 1)
            state["history"].append(row)
            self.log(row)
            print(" ".join(f"{k}={format_lr(v) if k == 'lr' else v}" for k, v in row.items()
                           if k not in ("step", "kind") and not k.startswith("train_loss")), flush=True)
            state.update(epoch=epoch + 1, batch_in_epoch=0, accum=None)
            if last:
                state["final"] = metrics
            self.save()
            last_save = time.monotonic()
        if state["final"] is None:  # --epochs 0: the untrained heads, a chance-level reference
            state["final"] = self.evaluate(val_loader)
            self.save()
        self.guard.check()
        if self.writer is not None:
            self.writer.close()
        return state["final"]

    def evaluate(self, val_loader) -> dict:
        skipped: list[str] = []
        metrics = evaluate(self.probe, val_loader, self.device, progress=True, skipped=skipped)
        self.note_skipped(skipped, "validation", self.state["step"])
        return metrics

"""One vocabulary for "which encoder weights": the ``--checkpoint`` option of every benchmark.

``--checkpoint`` accepts

* a checkpoint file (``runs/pretrain/checkpoint.pth``, a snapshot ``.pth``),
* a run folder (its rolling ``checkpoint.pth``: ``runs/pretrain/alexnet_lab-...``),
* ``random:ENCODER``: a seeded random initialisation of that encoder (``random:alexnet_lab``),
* ``random``: the same, the encoder coming from ``--encoder`` (the caller passes it, or a default).

Use::

    ref = parse_checkpoint_ref(args.checkpoint, encoder=args.encoder)   # in validate(): UsageError if wrong
    name = ref.model_name()          # the encoder's registry name (read from the file for a checkpoint)
    model = ref.load(seed=args.seed, geometry="transfer")               # in main()
    row = make_row(checkpoint=ref.label, ...)

Parsing checks only what is cheap (the file exists, the encoder name is registered); reading the
file happens in :meth:`CheckpointRef.model_name` and :meth:`CheckpointRef.load`, which turn a bad file
into a UsageError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ssl_colorize.engine.cli import UsageError, fail

RANDOM = "random"
#: The file a run folder keeps its rolling checkpoint in (ssl_colorize.engine.run.CHECKPOINT_NAME).
ROLLING_NAME = "checkpoint.pth"


@dataclass(frozen=True)
class CheckpointRef:
    """A parsed ``--checkpoint``.

    ``kind``: "file" (a checkpoint file), "folder" (a run folder; ``path`` is its checkpoint.pth) or
    "random"; ``path``: the checkpoint file (None for random); ``encoder``: the encoder's name when
    known without reading the file (random, or given with ``--encoder``); ``text``: the option as given;
    ``option``: the option's name, for messages.
    """

    kind: str
    path: Path | None
    encoder: str | None
    text: str
    option: str = "--checkpoint"

    @property
    def is_random(self) -> bool:
        return self.kind == RANDOM

    @property
    def label(self) -> str:
        """What result rows say in their ``checkpoint`` column: ``random`` or the path as given."""
        return RANDOM if self.is_random else self.text

    def model_name(self) -> str:
        """The encoder's registry name: the given one, or the one the checkpoint file records."""
        if self.is_random:
            if self.encoder is None:
                raise UsageError(f"{self.option} random needs an encoder: use random:ENCODER or --encoder")
            return self.encoder
        spec = self._read_spec()
        if self.encoder is not None and self.encoder != spec["name"]:
            raise UsageError(f"{self.option} {self.text} holds a {spec['name']!r}, not --encoder {self.encoder!r}")
        return spec["name"]

    def load(self, seed: int = 0, map_location: str = "cpu", **model_overrides):
        """The encoder, in eval mode: the checkpoint's weights, or a random init seeded by ``seed``.

        ``model_overrides`` change construction-only arguments (e.g. ``geometry="transfer"``).
        A file that is not a readable ssl_colorize checkpoint raises UsageError naming it.
        """
        from ssl_colorize.checkpoint import load_encoder

        source = RANDOM if self.is_random else self.path
        try:
            return load_encoder(source, encoder=self.model_name(), seed=seed, map_location=map_location,
                                **model_overrides)
        except ValueError as exc:
            raise UsageError(f"{self.option} {self.text}: {exc}") from exc

    def _read_spec(self) -> dict:
        import torch

        try:  # mmap: only the small "model" entry is read, not every tensor
            state = torch.load(self.path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as exc:  # torch raises several types for a torn or foreign file
            raise fail(self.option, self.text, f"cannot read {self.path}: {exc}") from exc
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "name" not in state["model"]:
            raise fail(self.option, self.text, "not an ssl_colorize checkpoint (no 'model' entry naming the encoder)")
        return state["model"]


def parse_checkpoint_ref(text: str, option: str = "--checkpoint", encoder: str | None = None) -> CheckpointRef:
    """``text`` -> :class:`CheckpointRef`; UsageError for a missing file, an empty run folder or an
    unknown encoder name. ``encoder``: the ``--encoder`` option (for ``random``, and to check a file)."""
    from ssl_colorize.models import list_models

    text = str(text)
    if encoder is not None and encoder not in list_models():
        raise fail("--encoder", encoder, f"unknown encoder; known: {', '.join(list_models())}")
    if text == RANDOM or text.startswith(RANDOM + ":"):
        named = text.partition(":")[2] or None
        if named is not None and named not in list_models():
            raise fail(option, text, f"unknown encoder {named!r}; known: {', '.join(list_models())}")
        if named is not None and encoder is not None and named != encoder:
            raise fail(option, text, f"names another encoder than --encoder {encoder}")
        return CheckpointRef(RANDOM, None, named or encoder, text, option)
    path = Path(text).expanduser()
    if path.is_dir():
        rolling = path / ROLLING_NAME
        if not rolling.is_file():
            raise fail(option, text, f"a folder without a {ROLLING_NAME} (not a run folder, or its run never saved)")
        return CheckpointRef("folder", rolling, encoder, text, option)
    if not path.exists():
        raise fail(option, text, "no such file or folder (or use random:ENCODER)")
    if not path.is_file():
        raise fail(option, text, "not a file")
    return CheckpointRef("file", path, encoder, text, option)

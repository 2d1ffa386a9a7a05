"""The settings of a training run: :class:`TrainConfig`, typed, frozen and checked as a whole when it
is built (before any image is read or any stage starts), with its closed vocabularies
(:class:`Stage`, :class:`Adapter1Init`) and the old names of renamed settings (:data:`RENAMED`).

A model card keeps the config of the run that made it (``training.train_config``, from
:meth:`TrainConfig.to_dict`); :meth:`TrainConfig.from_dict` reads it back, also from cards written
before a setting was renamed.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from models.augment import QUERY_GRAYSCALE
from models.descriptor import DescriptorConfig
from models.precision import Precision


class Stage(str, enum.Enum):
    """The three stages, named by the part each trains: the ``stage`` of every line of
    ``train_log.jsonl`` (with ``"cache"`` for the adapters' feature cache), the keys of the loss
    history and of the card's ``final_loss``, and the names of the checkpoints."""

    BACKBONE = "backbone"  # stage 1: trunk, GeM and the 512-d reduction
    ADAPTER1 = "adapter1"  # stage 2: the gallery-side 128-d adapter
    ADAPTER2 = "adapter2"  # stage 3: the query-side 128-d adapter, distilled to adapter 1


class Adapter1Init(str, enum.Enum):
    """How adapter 1's linear layer starts (stage 2)."""

    AUTO = "auto"  # whiten for a pretrained trunk, pca otherwise
    PCA = "pca"  # the top principal directions of the 512-d head
    WHITEN = "whiten"  # PCA whitening of the pooled features
    RANDOM = "random"  # ablation: the patent's plain init

    def resolve(self, pretrained_trunk: bool) -> Adapter1Init:
        """``auto`` -> ``whiten`` for a pretrained trunk, ``pca`` otherwise; the others as they are."""
        if self is Adapter1Init.AUTO:
            return Adapter1Init.WHITEN if pretrained_trunk else Adapter1Init.PCA
        return self


# Settings renamed since a run may have started: old name -> new name, with the same meaning. The
# ``--set`` of ``modscan train`` (a resumed run repeats its command) and :meth:`TrainConfig.from_dict`
# (a card's ``training.train_config``) accept the old names.
RENAMED: dict[str, str] = {
    "batch_size_adapter2": "batch_size_adapters",  # it always was the batch of both adapter stages
    "lr_adapter": "lr_adapter2",  # adapter 2's learning rate, beside lr_adapter1
}

# The smallest value of each numeric setting (None, where a setting takes it, is always allowed).
AT_LEAST: dict[str, float] = {
    "epochs_backbone": 0, "epochs_adapter1": 0, "epochs_adapter2": 0, "stage1_stop_after": 0,
    "batch_size": 1, "batch_size_adapters": 1, "monitor_every": 1, "plateau_patience": 0,
    "lr_backbone": 0, "lr_trunk": 0, "lr_adapter1": 0, "lr_adapter2": 0, "weight_decay": 0,
    "adapter_val_every": 0, "entropy_weight": 0, "distill_kl_weight": 0, "queue_size": 0,
    "synthetic_images": 0, "cache_views": 1, "distill_bank": 1, "background_photos": 0,
    "background_graphics": 0, "preload_max_side": 1, "max_images": 0, "threads": 0, "workers": 0,
}
POSITIVE = ("temperature", "distill_temperature")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the three stages; every ``modscan train --set KEY=VALUE`` is one of these
    fields or of :class:`~models.descriptor.DescriptorConfig`'s."""

    model: DescriptorConfig = field(default_factory=DescriptorConfig)
    epochs_backbone: int = 20
    epochs_adapter1: int = 40
    epochs_adapter2: int = 40
    batch_size: int = 64             # stage 1
    batch_size_adapters: int = 256   # stages 2 and 3 (on cached features)
    lr_backbone: float = 1e-3        # stage-1 heads (GeM p, 512-d reduction); the whole net when training from scratch
    lr_trunk: float = 5e-5           # a pretrained trunk fine-tunes gently (from-scratch trunks use lr_backbone)
    freeze_bn: bool = True           # pretrained trunks: BatchNorms keep ImageNet's running statistics
    imagenet_check: str | None = None  # photos named by WordNet id: top-1 of the imported weights, in the card
    monitor_every: int = 1           # stage-1 epochs between monitor evaluations (when a monitor is given)
    plateau_patience: int = 2        # stop stage 1 after this many monitor checks without a gain ...
    plateau_min_delta: float = 0.003  # ... of at least this much in the monitored metric
    stage1_stop_after: int | None = None  # end stage 1 after this many epochs of the epochs_backbone schedule
    lr_adapter1: float = 3e-4        # adapter 1 starts from PCA (whitening): fine-tune it gently
    lr_adapter2: float = 3e-3
    adapter1_init: Adapter1Init = Adapter1Init.AUTO
    adapter_val_every: int = 10      # stages 2-3 hold out every n-th training image and keep their best epoch (0: off)
    weight_decay: float = 1e-4
    temperature: float = 0.05
    entropy_weight: float = 3.0
    queue_size: int = 2048           # memory queue of past gallery-view embeddings (stage 1)
    synthetic_images: int = 400      # generated everyday pictures added to the photos
    query_grayscale: float = QUERY_GRAYSCALE  # share of stage-1 (and cached) query views turned to grayscale
    cache_views: int = 6
    distill_kl_weight: float = 0.25  # stage 3 relational term (cosine dominates)
    distill_temperature: float = 0.05
    distill_bank: int = 4096
    background_photos: int = 600     # score-normalisation bank shipped with the model
    background_graphics: int = 400
    preload_max_side: int = 320
    max_images: int | None = None    # None or 0: every image
    init_from: str | None = None     # model dir whose trunk/GeM/reduction warm-start stage 1
    precision: Precision = Precision.AUTO  # trunk precision
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    workers: int = 1                 # DataLoader processes for augmentation (raise on GPU machines)

    def __post_init__(self) -> None:
        """Enums from their values; then every setting checked, all problems in one ``ValueError``."""
        problems = []
        for name, kind in (("adapter1_init", Adapter1Init), ("precision", Precision)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                problems.append(f"{name} must be one of {[e.value for e in kind]}, got {value!r}")
        problems += self.type_problems()
        if not problems:  # ranges only make sense on values of the right type
            problems += self.range_problems()
        if problems:
            raise ValueError("; ".join(problems))

    def type_problems(self) -> list[str]:
        """Each field's value against its declared type (``int`` refuses bools and floats; a
        ``float`` takes an ``int``)."""
        out = []
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            if not _is_a(value, hint):
                out.append(f"{f.name} must be {_type_name(hint)}, got {value!r}")
        return out

    def range_problems(self) -> list[str]:
        out = [f"{name} must be >= {low:g}, got {getattr(self, name)}" for name, low in AT_LEAST.items()
               if getattr(self, name) is not None and getattr(self, name) < low]
        out += [f"{name} must be > 0, got {getattr(self, name)}" for name in POSITIVE if getattr(self, name) <= 0]
        if not 0 <= self.query_grayscale <= 1:
            out.append(f"query_grayscale must be in [0, 1], got {self.query_grayscale}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, enums as their values: the card's ``training.train_config``."""
        d = asdict(self)
        d.update(model=self.model.to_dict(), adapter1_init=self.adapter1_init.value, precision=self.precision.value)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """The config :meth:`to_dict` wrote, also in an older version's words: a renamed setting is
        read under its new name (:data:`RENAMED`), a setting this version no longer has is left out."""
        known = {f.name for f in fields(cls)}
        kw = {RENAMED.get(k, k): v for k, v in d.items() if RENAMED.get(k, k) in known}
        if isinstance(kw.get("model"), Mapping):
            kw["model"] = DescriptorConfig.from_dict(kw["model"])
        return cls(**kw)


def _is_a(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_a(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))

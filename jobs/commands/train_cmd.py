"""``modscan train``: the three-stage training of the descriptor (:mod:`models.training`).

Its ``--set KEY=VALUE`` overrides are parsed here, in the command layer: each value is converted to
its field's declared type (``TrainConfig`` or ``DescriptorConfig``), the old name of a renamed
setting (:data:`models.training.RENAMED`) is read under its new one, so that a run started with
the old names resumes with the same command, and the whole config is built and checked before any
image is read. Every refusal is a :class:`~pipeline.errors.UsageError` (exit 2).
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
import typing
from collections.abc import Iterable
from typing import Any

from pipeline.errors import UsageError

if typing.TYPE_CHECKING:
    from models.training import TrainConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="three-stage self-supervised training of the descriptor")
    p.add_argument("--images", required=True, help="folder of training photos (recursive)")
    p.add_argument("--out", required=True, help="output model directory (checkpoints resume from here)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. epochs_backbone=30 high_res=224 low_res=160")
    p.add_argument("--monitor-photos", metavar="DIR",
                   help="photos for the stage-1 monitor (an evaluation benchmark built from them): "
                        "stage 1 stops at its plateau and keeps the best epoch")
    p.add_argument("--monitor-seed", type=int, default=0, help="seed of the monitor's benchmark")
    p.set_defaults(fn=run)


def run(a: argparse.Namespace) -> int:
    """Build and check the config, then train (resuming from ``--out``) and print the card."""
    from models.training import train

    cfg = build_config(a.set or [])
    monitor = None
    if a.monitor_photos:
        from models.descriptor import DescriptorModel
        from pipeline.evaluation.train_monitor import stage1_monitor

        monitor = stage1_monitor(a.monitor_photos, DescriptorModel(cfg.model), seed=a.monitor_seed)
    card = train(a.images, a.out, cfg, command="modscan " + " ".join(sys.argv[1:]), monitor=monitor)
    print(json.dumps(card.to_dict(), indent=2))
    return 0


def build_config(pairs: Iterable[str]) -> TrainConfig:
    """``--set`` pairs -> the checked config; any refusal (a pair, a value, the config's own
    checks) is a :class:`UsageError`."""
    from models.descriptor import DescriptorConfig
    from models.training import TrainConfig

    model_over, train_over = parse_overrides(pairs)
    try:
        return TrainConfig(model=DescriptorConfig(**model_over), **train_over)
    except ValueError as e:
        raise UsageError(str(e)) from None


def parse_overrides(pairs: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``key=value`` strings -> (DescriptorConfig overrides, TrainConfig overrides), each value
    converted to its field's declared type, an old name under its new one. Unknown keys, a missing
    ``=``, values of the wrong type and a setting given under both its names raise
    :class:`UsageError` naming the offending ``--set``."""
    from models.descriptor import DescriptorConfig
    from models.training import RENAMED, TrainConfig

    model_hints = typing.get_type_hints(DescriptorConfig)
    train_hints = {k: v for k, v in typing.get_type_hints(TrainConfig).items() if k != "model"}
    model_over: dict[str, Any] = {}
    train_over: dict[str, Any] = {}
    given_as: dict[str, str] = {}  # setting -> the name it was given under
    for p in pairs:
        k, eq, v = p.partition("=")
        if not eq or not k:
            raise UsageError(f"--set {p}: expected key=value")
        name = RENAMED.get(k, k)
        if given_as.setdefault(name, k) != k:
            raise UsageError(f"--set {k}: the old name of {name}, which is also set; give one of them")
        if name in model_hints:
            model_over[name] = coerce(k, v, model_hints[name])
        elif name in train_hints:
            train_over[name] = coerce(k, v, train_hints[name])
        else:
            raise UsageError(f"--set {k}: unknown key; known: {sorted(model_hints) + sorted(train_hints)}")
    return model_over, train_over


def coerce(key: str, raw: str, hint: Any) -> Any:
    """``raw`` as the type ``hint`` of a config field (``int``, ``float``, ``bool``, ``str``, enums,
    ``X | None``); a :class:`UsageError` naming the key otherwise."""
    args = typing.get_args(hint)
    if type(None) in args:
        if raw.lower() in ("none", "null", ""):
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise UsageError(f"--set {key}={raw}: expected true or false")
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            raise UsageError(f"--set {key}={raw}: expected {'an integer' if hint is int else 'a number'}") from None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(raw)
        except ValueError:
            raise UsageError(f"--set {key}={raw}: expected one of {[e.value for e in hint]}") from None
    return raw

"""``modscan card [--model DIR]``: verify a model's checksum and print its model card."""

from __future__ import annotations

import argparse
import json


def cli_card(a: argparse.Namespace) -> int:
    from models.card import load_model

    _, card = load_model(a.model)
    print(json.dumps(card.to_dict(), indent=2))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("card", help="verify a model's checksum and print its model card")
    p.add_argument("--model", default=None)
    p.set_defaults(fn=cli_card)

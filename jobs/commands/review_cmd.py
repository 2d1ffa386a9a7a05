"""``modscan review apply DECISIONS.csv --gallery URI``: reviewers' decisions -> one gallery version."""

from __future__ import annotations

import argparse
import json


def cli_review(a: argparse.Namespace) -> int:
    from models.card import read_card
    from pipeline.gallery.extract import local_extractor
    from pipeline.ingest.storage import open_store, split_uri
    from pipeline.ops.review_decisions import apply_decisions

    st, name = split_uri(a.decisions)
    text = st.read_text(name)
    card = read_card(a.model)
    # A day's review is tens to hundreds of uploads: extracted in-process, without starting Ray.
    res = apply_decisions(open_store(a.gallery), text, a.decisions, card, local_extractor(a.model),
                          input_uri=a.input, who=a.who, dry_run=a.dry_run)
    out = {"version": res.version, "parent": res.parent, "dry_run": a.dry_run,
           "decisions": [{"line": c.line, "decision": c.decision, "effect": c.effect,
                          "reference_id": c.reference_id, "bank": c.bank, "image": c.image,
                          "disabled_until": c.disabled_until} for c in res.changes],
           "added": res.added}
    print(json.dumps(out, indent=2))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("review", help="feed reviewers' decisions back into the gallery")
    rs = p.add_subparsers(dest="rcmd", required=True)
    q = rs.add_parser("apply", help="apply a DECISIONS.csv as one new gallery version (all rows or none)")
    q.add_argument("decisions", metavar="DECISIONS.csv", help="local path or s3:// URI")
    q.add_argument("--gallery", required=True, help="gallery root URI")
    q.add_argument("--input", default=None, help="prefix that relative image_key values are under (the run's --input)")
    q.add_argument("--model", default=None, help="the gallery's model (default: the shipped model)")
    q.add_argument("--who", default=None, help="operator recorded in the audit log (default: $MODSCAN_OPERATOR or the OS user)")
    q.add_argument("--dry-run", action="store_true", help="validate and show the plan; write nothing")
    q.set_defaults(fn=cli_review)

"""``fetalscan audit verify LOG`` — check the service's hash-chained audit trail.

Exit code 0 when the log is intact, 2 when it is not (the error line names the first bad
line: an edited, inserted, deleted or reordered entry, or a truncated end). See
:mod:`fetalscan.serve.audit` and docs/service.md, "Audit trail".
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: Place of this command in ``fetalscan --help`` (beside ``serve``).
ORDER = 61


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="check the service's audit trail (audit verify LOG)",
                       description="Tools for the service's hash-chained audit trail (docs/service.md).")
    commands = p.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)
    v = commands.add_parser(
        "verify", help="check every entry's hash and the chain; exit 0 when intact, 2 when not",
        description="Check an audit log written by `fetalscan serve`: each entry's SHA-256, the chain of prev_hash "
                    "and seq (an edited, inserted, deleted or reordered entry is found and its line named), and the "
                    "head: entries cut off the end of a log leave a valid chain, so the log is checked against its "
                    "head file (LOG.head, written with every entry) and, with --expect-head, against a head hash "
                    "you recorded elsewhere (the hash this command prints). Exit 0: intact; 2: not.")
    v.add_argument("log", type=Path, metavar="LOG", help="the audit log (JSON lines), e.g. runs/serve/audit.jsonl")
    v.add_argument("--expect-head", default=None, metavar="HASH",
                   help="a head hash recorded earlier (printed by a previous verify): it must be in the log")
    v.add_argument("--head-file", type=Path, default=None, metavar="PATH",
                   help="the head file to check against (default: LOG.head when it exists)")
    v.add_argument("--no-head-file", action="store_true", help="do not check against a head file")
    v.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    from fetalscan.cli._ui import info_line, warn_line
    from fetalscan.serve.audit import AuditError, verify

    head_file = False if args.no_head_file else (args.head_file if args.head_file is not None else True)
    result = verify(args.log, expect_head=args.expect_head, head_file=head_file)
    if not result.ok:
        raise AuditError(result.message())
    for note in result.notes:
        warn_line(note)
    info_line(result.message())
    return 0

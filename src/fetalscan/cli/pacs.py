"""``fetalscan pacs find | pull | push`` — search, retrieve and store studies over DICOMweb.

- ``pacs find``: QIDO-RS search of studies by Study Instance UID, Patient ID or date;
  with ``--study`` also that study's series.
- ``pacs pull``: WADO-RS retrieve of a study (or one series) into ``--out`` as
  ``<SOP Instance UID>.dcm`` files.
- ``pacs push``: STOW-RS store of DICOM files and folders.

Credentials come from the environment (``FETALSCAN_PACS_USER`` / ``FETALSCAN_PACS_PASSWORD``
or ``FETALSCAN_PACS_TOKEN``), never from flags. See ``docs/pacs.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: Place of these commands in ``fetalscan --help`` (beside ``serve``: moving studies in and out).
ORDER = 65


def register(sub: argparse._SubParsersAction) -> None:
    pacs = sub.add_parser(
        "pacs", help="search, pull and push studies on a PACS over DICOMweb (QIDO-RS, WADO-RS, STOW-RS)",
        description="Talk to a PACS over DICOMweb (DICOM PS3.18). --url is the DICOMweb root, e.g. "
                    "http://127.0.0.1:8042/dicom-web for Orthanc. Credentials come from the environment: "
                    "FETALSCAN_PACS_USER and FETALSCAN_PACS_PASSWORD (HTTP basic), or FETALSCAN_PACS_TOKEN "
                    "(bearer).")
    psub = pacs.add_subparsers(dest="pacs_command", metavar="SUBCOMMAND", required=True)

    p = psub.add_parser("find", help="search studies (QIDO-RS) by UID, patient ID or date",
                        description="List the studies matching every given key (QIDO-RS Search for Studies); "
                                    "with --study, also the study's series.")
    _connection(p)
    p.add_argument("--study", metavar="UID", default=None, help="Study Instance UID")
    p.add_argument("--patient-id", metavar="ID", default=None, help="Patient ID (exact match)")
    p.add_argument("--date", metavar="YYYYMMDD", default=None,
                   help="Study Date, or a range YYYYMMDD-YYYYMMDD (either end may be left open)")
    p.add_argument("--limit", type=int, default=100, help="most studies listed (default: 100)")
    p.set_defaults(func=cmd_find)

    p = psub.add_parser("pull", help="retrieve a study or series (WADO-RS) into a folder",
                        description="Retrieve every instance of a study (or of one series) into --out, one file "
                                    "per instance named <SOP Instance UID>.dcm, byte for byte as the PACS holds it.")
    _connection(p)
    p.add_argument("--study", metavar="UID", required=True, help="Study Instance UID")
    p.add_argument("--series", metavar="UID", default=None, help="only this Series Instance UID")
    p.add_argument("--out", type=Path, required=True, help="folder for the files (created when missing)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (files are replaced)")
    p.set_defaults(func=cmd_pull)

    p = psub.add_parser("push", help="store DICOM files and folders (STOW-RS)",
                        description="Store DICOM files on the PACS (STOW-RS); folders are searched recursively "
                                    "for DICOM files. Every instance the PACS refuses is named with the reason.")
    _connection(p)
    p.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_DIR", help="DICOM files or folders")
    p.set_defaults(func=cmd_push)


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="DICOMweb root of the PACS, e.g. http://127.0.0.1:8042/dicom-web")
    p.add_argument("--user", default=None,
                   help="user name for HTTP basic authentication (default: $FETALSCAN_PACS_USER; the password is "
                        "always $FETALSCAN_PACS_PASSWORD)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for each answer from the PACS (default: 60; connecting: 5)")


def _client(args: argparse.Namespace):
    from fetalscan.pacs import PacsClient, config_from_env

    return PacsClient(config_from_env(args.url, username=args.user, read_timeout_s=args.timeout))


def cmd_find(args: argparse.Namespace) -> int:
    from fetalscan.cli._ui import info_line, print_table

    with _client(args) as pacs:
        studies = pacs.search_studies(study_uid=args.study, patient_id=args.patient_id, date=args.date,
                                      limit=args.limit)
        if not studies:
            info_line("no study matches")
            return 0
        print_table(f"{len(studies)} study(ies)", ["Study Instance UID", "date", "modalities", "series", "instances"],
                    [[s.study_uid, s.date, ",".join(s.modalities) or None, s.n_series, s.n_instances]
                     for s in studies])
        if args.study:
            series = pacs.search_series(args.study)
            print_table(f"series of study {args.study}", ["Series Instance UID", "modality", "number", "instances"],
                        [[s.series_uid, s.modality, s.number, s.n_instances] for s in series])
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from fetalscan.cli._ui import info_line
    from fetalscan.fileio import check_out_dir, prepare_out_dir

    check_out_dir(args.out, args.overwrite)
    with _client(args) as pacs:
        pacs.require_study(args.study)
        out = prepare_out_dir(args.out, args.overwrite)
        files = pacs.retrieve(args.study, out, series_uid=args.series)
    info_line(f"{len(files)} instance(s) written to {out}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from fetalscan.cli._ui import info_line
    from fetalscan.errors import FetalscanError
    from fetalscan.pacs import dicom_files

    files = dicom_files(args.paths)
    if not files:
        raise FetalscanError(f"no DICOM file found in {', '.join(str(p) for p in args.paths)}")
    with _client(args) as pacs:
        result = pacs.store(files)
    info_line(f"{len(result.stored)} instance(s) stored on {args.url}")
    return 0

"""``fetalscan deid IN OUT``: de-identify DICOM files (PS3.15 Annex E Basic Profile, via dicognito).

Parses the flags into :class:`~fetalscan.privacy.deid.DeidConfig` and calls
:func:`~fetalscan.privacy.deid.deidentify`; see ``docs/privacy.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fetalscan.cli._ui import error_line, info_line, warn_line

#: Place of this command in ``fetalscan --help``: before the data enter a study.
ORDER = 5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deid", help="de-identify DICOM files (PS3.15 Annex E Basic Profile); optionally blank burned-in text",
        description="De-identify a DICOM file or folder tree into OUT (same sub-folders, files named by their new "
        "SOP Instance UID): PS3.15 Annex E Basic Application Level Confidentiality Profile through dicognito -- "
        "UIDs remapped consistently across the run, names and IDs replaced by pseudonyms, private tags, free "
        "text and descriptions removed, dates emptied (or shifted per patient). The input is never modified. "
        "A file that fails is named and the others are still written (exit code 2 if any failed).")
    p.add_argument("src", metavar="IN", type=Path, help="a DICOM file or a folder (searched recursively)")
    p.add_argument("out", metavar="OUT", type=Path, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--keep-dates-shifted", action="store_true",
                   help="keep dates, moved back by one random number of days per patient (62-730) so that "
                        "intervals and gestational age stay computable (PS3.15 E.3.6 modified dates); "
                        "default: every date and time is emptied")
    p.add_argument("--key", type=Path, default=None, metavar="KEYFILE",
                   help="write the original -> pseudonym key (CSV, owner-readable only) to KEYFILE, outside IN "
                        "and OUT; default: no key is kept and the pseudonyms cannot be traced back")
    p.add_argument("--mask-burned-in", action="store_true",
                   help="blank every pixel outside the scan sector (Ultrasound Region Sequence, else found in the "
                        "pixels), where scanners burn in names, IDs and dates; sets Burned In Annotation to NO "
                        "(PS3.15 E.3.1 Clean Pixel Data Option). A file whose sector is not found fails")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty OUT; its files are replaced atomically")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fetalscan.privacy.deid import DeidConfig, deidentify

    cfg = DeidConfig(keep_dates_shifted=args.keep_dates_shifted, mask_burned_in=args.mask_burned_in,
                     key_file=args.key, overwrite=args.overwrite)
    res = deidentify(args.src, args.out, cfg)
    info_line(f"de-identified {len(res.written)} file(s) into {args.out}"
              + (f"; pixels outside the scan sector blanked in {res.masked}" if cfg.mask_burned_in else "")
              + (f"; {len(res.skipped)} non-DICOM file(s) skipped" if res.skipped else ""))
    if res.key_file is not None:
        info_line(f"key (original -> pseudonym): {res.key_file} -- keep it apart from the de-identified files")
    if res.pixels_unchecked:
        warn_line(f"{res.pixels_unchecked} file(s) may still carry names, IDs or dates burned into the pixels "
                  "(Burned In Annotation is not NO; Patient Identity Removed set to NO): rerun with --mask-burned-in")
    for rel, reason in res.failed:
        error_line(f"not written: {rel}: {reason}" if str(rel) not in reason else f"not written: {reason}")
    if res.failed:
        error_line(f"{len(res.failed)} of {len(res.failed) + len(res.written)} DICOM file(s) failed and were not "
                   "written; the others are complete")
        return 2
    return 0

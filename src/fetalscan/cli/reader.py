"""``fetalscan reader-study create | analyze | power``: design, analyse and size a multi-reader multi-case study.

- ``create``: per-reader, per-session case lists from a case manifest (``fetalscan.reader.design``).
- ``analyze``: empirical AUC, sensitivity/specificity, Obuchowski-Rockette and DBM, reading time ->
  ``mrmc.json`` + ``report.html`` (``fetalscan.reader.analysis``).
- ``power``: power of the OR random-reader random-case test for a planned study (``fetalscan.reader.power``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: Place of these commands in ``fetalscan --help`` (after the service: a study uses a trained model).
ORDER = 62


def register(sub: argparse._SubParsersAction) -> None:
    p0 = sub.add_parser("reader-study", help="reader study: design, MRMC analysis (Obuchowski-Rockette), power",
                        description="Design a multi-reader multi-case reader study, analyse its readings "
                        "(readers and cases random: Obuchowski-Rockette with Hillis df; DBM) and size the next one.")
    rs = p0.add_subparsers(dest="reader_command", metavar="SUBCOMMAND", required=True)

    p = rs.add_parser("create", help="per-reader, per-session case lists from a case manifest",
                      description="Write design.json, cases.csv, worklist.csv, readers/<R>.csv, readers.csv and "
                      "logins.csv. Arms are counterbalanced over sessions by a Williams square; case order is random "
                      "per reader and session; split-plot blocks are balanced by class.")
    p.add_argument("--cases", type=Path, required=True, help="case manifest CSV (path,label,group; a case = a group)")
    p.add_argument("--readers", type=int, default=3, help="number of readers (default: 3)")
    p.add_argument("--arms", default="unaided,concurrent,second-read",
                   help="comma-separated arms: unaided, concurrent, second-read (default: all three)")
    p.add_argument("--design", default="crossover", choices=("crossover", "split-plot"),
                   help="crossover: every reader reads every case in every arm; split-plot: reader groups read "
                        "their own case block in every arm (default: crossover)")
    p.add_argument("--washout-days", type=int, default=28, help="days between sessions (default: 28)")
    p.add_argument("--blocks", type=int, default=2, help="split-plot: reader groups = case blocks (default: 2)")
    p.add_argument("--normal-label", default="normal", help="manifest label of normal cases (default: normal)")
    p.add_argument("--seed", type=int, default=0, help="random seed of arm orders, blocks and case orders (default: 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    p.set_defaults(func=cmd_create)

    p = rs.add_parser("analyze", help="MRMC analysis of a readings CSV -> mrmc.json + report.html",
                      description="Readings CSV: reader,treatment,case,truth,rating[,answer,seconds,session] "
                      "(the MRMCaov / RJafroc layout plus optional columns); fully crossed (every reader reads every "
                      "case in every treatment) or split-plot (reader groups read their own case blocks).")
    p.add_argument("reads", type=Path, help="readings CSV")
    p.add_argument("--out", type=Path, required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level; CIs are 1 - alpha (default: 0.05)")
    p.add_argument("--cases", default=None, help="the design's cases.csv: readings of other cases, or with another "
                                                 "truth, are errors")
    p.add_argument("--normal-label", default="normal", help="answer meaning normal besides 0/normal/negative/no")
    p.add_argument("--time-model", default="anova", choices=("anova", "mixedlm", "none"),
                   help="reading-time comparison: anova (crossed mixed model incl. arm x reader, fast), mixedlm "
                        "(statsmodels, reader and case intercepts) or none (default: anova)")
    p.set_defaults(func=cmd_analyze)

    p = rs.add_parser("power", help="power of the OR test for a planned study (Hillis-Obuchowski)",
                      description="Power of the Obuchowski-Rockette random-reader random-case test of two "
                      "treatments, from a pilot's variance components (or ones given), for J readers and K cases.")
    p.add_argument("--pilot", type=Path, default=None, help="pilot readings CSV (as for analyze)")
    p.add_argument("--treatments", default=None, help="two pilot treatments A,B (default: the first two, sorted)")
    p.add_argument("--readers", type=int, nargs="+", required=True, help="planned number(s) of readers")
    p.add_argument("--cases", type=int, nargs="+", required=True, help="planned number(s) of cases")
    p.add_argument("--effect", type=float, default=None,
                   help="AUC difference to detect (default: the pilot's, which is optimistic; prefer the smallest "
                        "clinically relevant difference)")
    p.add_argument("--alpha", type=float, default=0.05, help="two-sided significance level (default: 0.05)")
    p.add_argument("--cov-method", default="jackknife", choices=("jackknife", "delong", "unbiased"),
                   help="covariance estimator for the pilot (default: jackknife)")
    for name in ("var-tr", "var", "cov1", "cov2", "cov3"):
        p.add_argument(f"--{name}", type=float, default=None,
                       help=f"OR component {name.replace('-', '_')} instead of a pilot (all five and --pilot-cases)")
    p.add_argument("--pilot-cases", type=int, default=None, help="number of cases the given components refer to")
    p.set_defaults(func=cmd_power)

    p = rs.add_parser("serve", help="the reading app: register a design folder and start the service",
                      description="Register a `reader-study create` folder in the service's database and start "
                      "`fetalscan serve` (every flag after -- goes to it, e.g. -- --model M --port 8000). Readers "
                      "open /static/reading.html and log in with their code from logins.csv; the coordinator "
                      "exports the readings from /api/v1/reading-admin/studies/ID/reads.csv (service token).")
    p.add_argument("study", type=Path, help="folder written by `fetalscan reader-study create`")
    p.add_argument("serve_args", nargs=argparse.REMAINDER, help="flags of `fetalscan serve`, after --")
    p.set_defaults(func=cmd_serve)


def cmd_create(args: argparse.Namespace) -> int:
    from fetalscan.cli._ui import info_line, print_table, warn_line
    from fetalscan.reader.design import DesignConfig, create_study

    cfg = DesignConfig(readers=args.readers, arms=tuple(a.strip() for a in args.arms.split(",") if a.strip()),
                       design=args.design, washout_days=args.washout_days, blocks=args.blocks, seed=args.seed,
                       normal_label=args.normal_label)
    summary = create_study(args.cases, args.out, cfg, overwrite=args.overwrite)
    print_table("reader schedule", ["reader", "block", *[f"session {i + 1}" for i in range(len(cfg.arms))]],
                [[r["reader"], r["block"], *r["arm_order"]] for r in summary["readers"]])
    for note in summary["notes"]:
        warn_line(note)
    info_line(f"{summary['n_cases']} cases, {summary['n_readings']} readings -> {args.out} "
              "(logins.csv holds each reader's login code: hand out one line per reader)")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from fetalscan.cli._ui import info_line, print_table
    from fetalscan.reader.analysis import AnalyzeConfig, analyze

    cfg = AnalyzeConfig(alpha=args.alpha, normal_label=args.normal_label, cases=args.cases,
                        time_model=args.time_model)
    res = analyze(args.reads, args.out, cfg, overwrite=args.overwrite)
    print_table("empirical AUC", ["reader", *res["treatments"]],
                [[r, *[res["auc"][t][r] for t in res["treatments"]]] for r in res["readers"]]
                + [["mean", *[res["auc_mean"][t] for t in res["treatments"]]]])
    rows = []
    for method, o in res["or"].items():
        rows.append([method, "RRRC", o["rrrc"]["diff"], o["rrrc"]["F"], f"1,{o['rrrc']['df2']:.2f}", o["rrrc"]["p"],
                     f"{o['rrrc']['ci_low']:.4f} to {o['rrrc']['ci_high']:.4f}"])
        rows.append([method, "FRRC (chi2)", o["frrc"]["diff"], o["frrc"]["chi2"], "", o["frrc"]["p"],
                     f"{o['frrc']['ci_low']:.4f} to {o['frrc']['ci_high']:.4f}"])
    o = res["or"]["jackknife"]["rrfc"]
    rows.append(["-", "RRFC", o["diff"], o["F"], f"1,{o['df2']:.0f}", o["p"],
                 f"{o['ci_low']:.4f} to {o['ci_high']:.4f}"])
    t0, t1 = res["treatments"][:2]
    print_table(f"Obuchowski-Rockette ({t0} - {t1})", ["covariance", "analysis", "diff", "stat", "df", "p", "95% CI"],
                rows)
    info_line(f"wrote {args.out / 'mrmc.json'} and {args.out / 'report.html'}")
    return 0


def cmd_power(args: argparse.Namespace) -> int:
    from fetalscan.cli._ui import print_table
    from fetalscan.errors import FetalscanError
    from fetalscan.reader.power import ORParameters, or_parameters_from_reads, or_power
    from fetalscan.reader.reads import load_reads

    given = [args.var_tr, args.var, args.cov1, args.cov2, args.cov3]
    if args.pilot is not None:
        pair = tuple(args.treatments.split(",")) if args.treatments else None
        if pair is not None and len(pair) != 2:
            raise FetalscanError(f"--treatments takes two names A,B; got {args.treatments!r}")
        params = or_parameters_from_reads(load_reads(args.pilot), pair, args.cov_method)
    elif all(v is not None for v in given) and args.pilot_cases:
        params = ORParameters(*given, n_cases=args.pilot_cases)
    else:
        raise FetalscanError("give --pilot READS.csv, or all of --var-tr --var --cov1 --cov2 --cov3 --pilot-cases")
    rows = []
    for j in args.readers:
        for k in args.cases:
            res = or_power(params, j, k, args.effect, args.alpha)
            rows.append([j, k, res.effect, res.df2, res.noncentrality, res.power])
    print_table("power of the OR random-reader random-case test (Hillis-Obuchowski)",
                ["readers", "cases", "effect (AUC)", "df2", "noncentrality", "power"], rows)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fetalscan.cli import build_parser
    from fetalscan.cli._ui import info_line
    from fetalscan.cli.serve import cmd_serve as serve
    from fetalscan.reader.store import ReadingStore

    rest = [a for a in args.serve_args if a != "--"]
    serve_args = build_parser().parse_args(["serve", *rest])
    serve_args.verbose = args.verbose
    study = ReadingStore(serve_args.db).register_study(args.study)
    info_line(f"reading study {study['id']} registered in {serve_args.db}: readers log in at /static/reading.html "
              f"with their code from {args.study / 'logins.csv'}; export: "
              f"/api/v1/reading-admin/studies/{study['id']}/reads.csv (service token)")
    return serve(serve_args)

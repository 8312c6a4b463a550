"""Reader-study analysis: the published Van Dyke (1993) results, Roe-Metz simulations, power, bad input.

Published values are those of ``shared/data/mrmc/README.md`` (OR-DBM MRMC 2.51, MRMCaov,
RJafroc); the tolerances are half a unit of the last digit printed there.

Monte-Carlo bands (all seeded, a few seconds in all):
- null: 1000 Roe-Metz studies, rejection rate within 0.05 +/- 3 binomial SE (0.0069): [0.029, 0.071];
- effect: 200 studies, mean difference within 4 SE (+0.002 for the reader-averaging of Phi) of
  the population difference, 95% CI coverage in [0.90, 0.99];
- power: Hillis-Obuchowski power from population OR parameters (averaged over 300 simulated
  pilots) within 3 binomial SE + 0.03 (the approximation, Hillis et al. 2011) of the rejection
  rate of 300 simulated studies.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED
from fetalscan.errors import FetalscanError
from fetalscan.reader import mrmc
from fetalscan.reader.analysis import AnalyzeConfig, analyze, analyze_reads
from fetalscan.reader.covariance import (
    auc_covariance,
    auc_leave_one_out,
    proportion_leave_one_out,
)
from fetalscan.reader.fom import empirical_auc
from fetalscan.reader.power import ORParameters, or_parameters, or_parameters_from_reads, or_power
from fetalscan.reader.reads import Reads, load_reads, reads_from_rows
from fetalscan.reader.simulate import RoeMetzConfig, simulate_roe_metz
from fetalscan.reader.timing import anova_log_time, mixedlm_log_time

VANDYKE = SHARED / "data" / "mrmc" / "vandyke.csv"


@pytest.fixture(scope="module")
def vandyke() -> Path:
    if not VANDYKE.is_file():
        pytest.skip(f"Van Dyke data not found at {VANDYKE} (set FETALSCAN_SHARED)")
    return VANDYKE


@pytest.fixture(scope="module")
def vd_result(vandyke):
    return analyze_reads(load_reads(vandyke))


# ------------------------------------------------------------------ Van Dyke (1993), published values

PUBLISHED_AUC = {"1": [0.91964573, 0.85877617, 0.90386473, 0.97310789, 0.82979066],
                 "2": [0.94782609, 0.90531401, 0.92173913, 0.99935588, 0.92995169]}


def test_vandyke_per_reader_aucs_match_published(vd_result):
    for t, values in PUBLISHED_AUC.items():
        ours = [vd_result["auc"][t][r] for r in ["1", "2", "3", "4", "5"]]
        np.testing.assert_allclose(ours, values, atol=5e-9)
    assert vd_result["auc_mean"]["1"] == pytest.approx(0.89703704, abs=5e-9)
    assert vd_result["auc_mean"]["2"] == pytest.approx(0.94083736, abs=5e-9)
    assert vd_result["or"]["jackknife"]["rrrc"]["diff"] == pytest.approx(-0.04380032, abs=5e-9)


@pytest.mark.parametrize("method, F, df2, p", [
    ("jackknife", 4.456319, 15.25967, 0.05166569),
    ("delong", 4.484854, 15.06611, 0.05123303),
    ("unbiased", 4.489614, 15.03418, 0.0511618),
])
def test_vandyke_or_rrrc_matches_published(vd_result, method, F, df2, p):
    o = vd_result["or"][method]["rrrc"]
    assert o["F"] == pytest.approx(F, abs=5e-7)
    assert o["df1"] == 1
    assert o["df2"] == pytest.approx(df2, abs=5e-6)
    assert o["p"] == pytest.approx(p, abs=5e-9 if method != "unbiased" else 5e-8)


def test_vandyke_jackknife_ci_matches_published(vd_result):
    o = vd_result["or"]["jackknife"]["rrrc"]
    assert o["ci_low"] == pytest.approx(-0.0879594986, abs=5e-11)
    assert o["ci_high"] == pytest.approx(0.0003588544, abs=5e-11)


def test_vandyke_fixed_readers_and_fixed_cases_match_published(vd_result):
    fr = vd_result["or"]["jackknife"]["frrc"]
    assert fr["chi2"] == pytest.approx(5.47595, abs=5e-6)
    assert fr["p"] == pytest.approx(0.0193, abs=5e-5)
    fc = vd_result["or"]["jackknife"]["rrfc"]
    assert (fc["df1"], fc["df2"]) == (1, 4)
    assert fc["F"] == pytest.approx(8.704, abs=5e-4)
    assert fc["p"] == pytest.approx(0.0420, abs=5e-5)


def test_dbm_on_jackknife_pseudovalues_equals_or_jackknife(vd_result):
    d, o = vd_result["dbm"]["jackknife_pseudovalues"], vd_result["or"]["jackknife"]["rrrc"]
    assert d["F"] == pytest.approx(o["F"], rel=1e-10)
    assert d["df2"] == pytest.approx(o["df2"], rel=1e-10)


def test_mrmc_json_has_the_fixed_shape(vandyke, tmp_path):
    res = analyze(vandyke, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "mrmc.json").read_text())
    assert {"treatments", "readers", "auc", "auc_mean", "or", "time"} <= set(data)
    assert data["treatments"] == ["1", "2"] and data["readers"] == ["1", "2", "3", "4", "5"]
    assert set(data["or"]) == {"jackknife", "delong", "unbiased"}
    for block in data["or"].values():
        assert {"diff", "F", "df1", "df2", "p", "ci_low", "ci_high"} <= set(block["rrrc"])
        assert {"diff", "chi2", "p", "ci_low", "ci_high"} <= set(block["frrc"])
        assert {"diff", "F", "df1", "df2", "p", "ci_low", "ci_high"} <= set(block["rrfc"])
    assert data["time"] is None  # no seconds column
    assert res["or"]["jackknife"]["rrrc"]["F"] == pytest.approx(data["or"]["jackknife"]["rrrc"]["F"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and "can and cannot show" in html


# ------------------------------------------------------------------ the estimators themselves


def _small(seed=0, t=2, r=3, n0=12, n1=9, levels=None):
    cfg = RoeMetzConfig(n_readers=r, n_normal=n0, n_abnormal=n1, tau=tuple(0.3 * i for i in range(t)))
    x, truth = simulate_roe_metz(cfg, np.random.default_rng(seed))
    if levels:
        x = np.digitize(x, np.quantile(x, np.linspace(0, 1, levels + 1)[1:-1]))  # ties, like a 1-5 scale
    return x.astype(float), truth


def test_fast_jackknife_equals_leaving_each_case_out():
    x, truth = _small(levels=5)
    brute = np.array([empirical_auc(np.delete(x, k, axis=2), np.delete(truth, k)).reshape(-1)
                      for k in range(x.shape[2])])
    np.testing.assert_allclose(auc_leave_one_out(x, truth), brute, atol=1e-12)
    answers = (x > np.median(x)).astype(float)
    brute_sens = np.array([np.delete(answers, k, 2)[..., np.delete(truth, k) == 1].mean(-1).reshape(-1)
                           for k in range(x.shape[2])])
    np.testing.assert_allclose(proportion_leave_one_out(answers, truth, 1), brute_sens, atol=1e-12)


def test_delong_variance_of_one_auc_matches_the_textbook_formula():
    x, truth = _small(t=1, r=1, levels=6)
    pos, neg = x[0, 0, truth == 1], x[0, 0, truth == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    expected = psi.mean(1).var(ddof=1) / len(pos) + psi.mean(0).var(ddof=1) / len(neg)
    assert auc_covariance(x, truth, "delong")[0, 0] == pytest.approx(expected, rel=1e-12)


def test_unbiased_covariance_is_unbiased_for_the_variance_of_the_auc():
    """Mean unbiased estimate over many case samples ~ the empirical variance of the AUC."""
    rng = np.random.default_rng(5)
    cfg = RoeMetzConfig(n_readers=2, n_normal=15, n_abnormal=15, var_r=0, var_tr=0)
    aucs, est = [], []
    for _ in range(600):
        x, truth = simulate_roe_metz(cfg, rng)
        aucs.append(empirical_auc(x, truth)[0, 0])
        est.append(auc_covariance(x[:1, :1], truth, "unbiased")[0, 0])
    var = np.var(aucs, ddof=1)
    assert np.mean(est) == pytest.approx(var, rel=0.2)  # 600 samples: SE of a variance ~ 6%


def test_three_treatments_give_an_omnibus_test_and_every_pair():
    x, truth = _small(t=3, r=4, n0=30, n1=30)
    theta = empirical_auc(x, truth)
    res = mrmc.or_analysis(theta, auc_covariance(x, truth), ["a", "b", "c"])
    assert res["rrrc"]["df1"] == 2
    assert [(q["a"], q["b"]) for q in res["rrrc"]["pairwise"]] == [("a", "b"), ("a", "c"), ("b", "c")]
    for q in res["rrrc"]["pairwise"]:
        assert q["ci_low"] < q["diff"] < q["ci_high"]
    two = mrmc.or_analysis(theta[:2], auc_covariance(x[:2], truth), ["a", "b"])
    assert two["rrrc"]["F"] == pytest.approx(two["rrrc"]["pairwise"][0]["stat"] ** 2)
    assert set(res["single"]) == {"a", "b", "c"}
    for s in res["single"].values():
        assert 0 <= s["rrrc"]["ci"][0] <= s["mean"] <= s["rrrc"]["ci"][1] <= 1


def test_dbm_equals_or_jackknife_with_three_treatments():
    x, truth = _small(t=3, r=4, n0=25, n1=20, levels=5)
    theta = empirical_auc(x, truth)
    o = mrmc.rrrc(theta, auc_covariance(x, truth), ["a", "b", "c"])
    d = mrmc.dbm(mrmc.dbm_pseudovalues(theta, auc_leave_one_out(x, truth)))
    assert d["F"] == pytest.approx(o["F"], rel=1e-9)


# ------------------------------------------------------------------ Roe-Metz simulations


def _rrrc(cfg: RoeMetzConfig, rng) -> dict:
    x, truth = simulate_roe_metz(cfg, rng)
    return mrmc.rrrc(empirical_auc(x, truth), auc_covariance(x, truth), ["a", "b"])


def test_null_simulation_rejects_close_to_five_percent():
    rng = np.random.default_rng(20240601)
    cfg = RoeMetzConfig()  # no effect: tau = (0, 0)
    rate = np.mean([_rrrc(cfg, rng)["p"] < 0.05 for _ in range(1000)])
    assert 0.029 <= rate <= 0.071, rate


def test_simulation_where_readers_improve_recovers_the_effect():
    rng = np.random.default_rng(7)
    cfg = RoeMetzConfig(tau=(0.0, 0.5))
    truth_diff = float(cfg.auc()[0] - cfg.auc()[1])  # about -0.066
    runs = [_rrrc(cfg, rng) for _ in range(200)]
    diffs = np.array([r["diff"] for r in runs])
    assert abs(diffs.mean() - truth_diff) < 4 * diffs.std(ddof=1) / np.sqrt(len(diffs)) + 0.002
    assert np.mean([r["p"] < 0.05 for r in runs]) > 0.5
    coverage = np.mean([r["ci_low"] <= truth_diff <= r["ci_high"] for r in runs])
    assert 0.90 <= coverage <= 0.99


def test_power_formula_agrees_with_roe_metz_simulation():
    rng = np.random.default_rng(11)
    pilot = RoeMetzConfig(n_readers=5, n_normal=50, n_abnormal=50, tau=(0.0, 0.3))
    comps, diffs = [], []
    for _ in range(300):
        x, truth = simulate_roe_metz(pilot, rng)
        theta = empirical_auc(x, truth)
        k = mrmc.components(theta, auc_covariance(x, truth))
        comps.append([k.ms_tr - (k.var - k.cov1 - k.cov2 + k.cov3), k.var, k.cov1, k.cov2, k.cov3])
        diffs.append(theta[0].mean() - theta[1].mean())
    params = ORParameters(*np.mean(comps, axis=0), n_cases=100)
    effect = float(np.mean(diffs))
    for readers, n_each in ((5, 50), (7, 75)):
        planned = RoeMetzConfig(n_readers=readers, n_normal=n_each, n_abnormal=n_each, tau=(0.0, 0.3))
        predicted = or_power(params, readers, 2 * n_each, effect).power
        observed = np.mean([_rrrc(planned, rng)["p"] < 0.05 for _ in range(300)])
        se = np.sqrt(predicted * (1 - predicted) / 300)
        assert abs(predicted - observed) < 3 * se + 0.03, (readers, n_each, predicted, observed)


def test_power_at_the_pilot_size_has_the_pilot_f_as_noncentrality(vandyke):
    params = or_parameters_from_reads(load_reads(vandyke))
    res = or_power(params, 5, 114)
    assert res.noncentrality == pytest.approx(4.456319, abs=5e-6)  # lambda = observed F when sigma2_TR > 0
    assert res.df2 == pytest.approx(15.25967, abs=5e-5)
    assert or_power(params, 10, 300).power > or_power(params, 5, 114).power > or_power(params, 5, 114, 0.0).power
    assert or_power(params, 5, 114, 0.0).power == pytest.approx(0.05, abs=1e-9)


def test_power_refuses_impossible_plans():
    params = or_parameters(np.array([[0.8, 0.85], [0.9, 0.92]]), np.eye(4) * 1e-3, 100)
    with pytest.raises(FetalscanError, match="at least 2 readers"):
        or_power(params, 1, 100)


# ------------------------------------------------------------------ reading time


def test_reading_time_recovers_a_known_ratio_and_agrees_with_mixedlm():
    rng = np.random.default_rng(3)
    t, r, c = 2, 4, 30
    y = (2.0 + np.array([0.0, 0.3])[:, None, None] + rng.normal(0, 0.3, (1, r, 1)) + rng.normal(0, 0.3, (1, 1, c))
         + rng.normal(0, 0.2, (t, r, c)))
    a = anova_log_time(y, ["ai", "unaided"])["pairwise"][0]
    assert a["ci_low"] < np.exp(-0.3) < a["ci_high"]
    m = mixedlm_log_time(y, ["ai", "unaided"])["pairwise"][0]
    assert m["ratio"] == pytest.approx(a["ratio"], rel=1e-6)  # balanced: both estimate the difference of means


# ------------------------------------------------------------------ bad input names the rows

HEADER = "reader,treatment,case,truth,rating\n"


def _good_rows() -> list[str]:
    rows = []
    for t in ("A", "B"):
        for r in ("r1", "r2"):
            for k, truth in enumerate([0, 0, 1, 1]):
                rows.append(f"{r},{t},c{k},{truth},{k + (t == 'B')}")
    return rows


def _write(tmp_path: Path, rows: list[str], header: str = HEADER) -> Path:
    path = tmp_path / "reads.csv"
    path.write_text(header + "\n".join(rows) + "\n")
    return path


def test_good_small_file_loads(tmp_path):
    reads = load_reads(_write(tmp_path, _good_rows()))
    assert reads.shape == (2, 2, 4) and reads.truth.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[:1] + ["r1,A,c0,0,high"] + rows[2:], r"rating is not a number on line\(s\) 3"),
    (lambda rows: rows[:-1] + ["r2,B,c3,0,5"], r"case 'c3' has truth 0 on line\(s\) 17 and truth 1"),
    (lambda rows: [x for x in rows if not (x.startswith("r2,B"))], r"reader 'r2' has no readings in treatment"),
    (lambda rows: [x for x in rows if ",B," not in x], r"1 treatment\(s\) \('A'\); comparing"),
    (lambda rows: [x.replace(",1,", ",0,") for x in rows], r"every case is normal"),
    (lambda rows: rows + ["r1,A,c0,0,3"], r"read case 'c0' in treatment 'A' twice \(lines 2 and 18"),
    (lambda rows: rows[:-1], r"reader 'r2' in treatment 'B' did not read 1 case\(s\): 'c3'"),
])
def test_bad_readings_raise_an_error_naming_the_rows(tmp_path, edit, message):
    with pytest.raises(FetalscanError, match=message):
        load_reads(_write(tmp_path, edit(_good_rows())))


def test_unknown_cases_are_named(tmp_path):
    cases = tmp_path / "cases.csv"
    cases.write_text("case,truth\nc0,0\nc1,0\nc2,1\n")
    with pytest.raises(FetalscanError, match=r"1 case\(s\) not in the study's case list: 'c3' \(case 'c3' on line"):
        analyze(_write(tmp_path, _good_rows()), tmp_path / "out", AnalyzeConfig(cases=str(cases)))


def test_cli_exits_2_on_bad_input_and_writes_nothing(tmp_path, capsys):
    from fetalscan.cli import main

    bad = _write(tmp_path, _good_rows()[:1] + ["r1,A,c0,0,high"] + _good_rows()[2:])
    assert main(["reader-study", "analyze", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "line(s) 3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_analyze_and_power_run_on_a_small_study(tmp_path, capsys):
    from fetalscan.cli import main

    rng = np.random.default_rng(0)
    x, truth = _small(t=2, r=3, n0=20, n1=20)
    path = tmp_path / "reads.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["reader", "treatment", "case", "truth", "rating", "answer", "seconds", "session"])
        for i, arm in enumerate(["concurrent", "unaided"]):
            for j in range(3):
                for k in range(40):
                    w.writerow([f"R{j + 1}", arm, f"case{k}", truth[k], round(float(x[i, j, k]), 3),
                                "abnormal" if x[i, j, k] > 0.75 else "normal", round(float(rng.uniform(3, 20)), 1),
                                i + 1])
    assert main(["reader-study", "analyze", str(path), "--out", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "mrmc.json").read_text())
    assert data["treatments"] == ["concurrent", "unaided"]
    assert set(data["time"]["median"]) == {"concurrent", "unaided"}
    assert data["binary"]["sensitivity"]["or"]["jackknife"]["rrrc"]["df1"] == 1
    assert main(["reader-study", "power", "--pilot", str(path), "--readers", "4", "--cases", "80",
                 "--effect", "0.05"]) == 0
    assert "power" in capsys.readouterr().out


def test_reads_subset_keeps_the_order_given():
    reads = Reads(["a", "b", "c"], ["r1", "r2"], ["x", "y"], np.array([0, 1]), np.arange(12.0).reshape(3, 2, 2))
    sub = reads.subset_treatments(["c", "a"])
    assert sub.treatments == ["c", "a"] and sub.ratings[0, 0, 0] == 8.0


# ------------------------------------------------------------------ split-plot studies


def _split_plot(cfg: RoeMetzConfig, rng, groups: int = 2) -> Reads:
    """A Roe-Metz study in which reader group g reads only case block g (classes dealt evenly)."""
    x, truth = simulate_roe_metz(cfg, rng)
    t, r, c = x.shape
    rb = np.arange(r) % groups
    cb = np.empty(c, int)
    for v in (0, 1):
        idx = np.flatnonzero(truth == v)
        cb[idx] = np.arange(len(idx)) % groups
    x = x.copy()
    x[:, rb[:, None] != cb[None, :]] = np.nan
    return Reads(["a", "b"], [f"r{j}" for j in range(r)], [f"c{k}" for k in range(c)], truth, x,
                 reader_block=rb, case_block=cb)


def test_split_plot_estimates_are_blockwise_with_zero_cross_block_covariance():
    from fetalscan.reader.analysis import estimates

    reads = _split_plot(RoeMetzConfig(n_readers=4, n_normal=20, n_abnormal=20, mu=0.8), np.random.default_rng(2))
    theta, cov = estimates(reads, "auc", "jackknife")
    for ri, ci in reads.blocks():
        sub = reads.ratings[:, ri][:, :, ci]
        np.testing.assert_allclose(theta[:, ri], empirical_auc(sub, reads.truth[ci]))
    t, r = theta.shape
    rdr = np.tile(np.arange(r), t)
    other = reads.reader_block[rdr][:, None] != reads.reader_block[rdr][None, :]
    assert np.all(cov[other] == 0) and np.all(np.diag(cov) > 0)


def test_split_plot_null_simulation_rejects_close_to_five_percent():
    """1000 split-plot studies (2 groups of 3 readers, 50 cases each): rate within [0.029, 0.071]."""
    from fetalscan.reader.analysis import estimates

    rng = np.random.default_rng(99)
    cfg = RoeMetzConfig(n_readers=6, n_normal=50, n_abnormal=50)
    rejections = []
    for _ in range(1000):
        theta, cov = estimates(_split_plot(cfg, rng))
        rejections.append(mrmc.rrrc(theta, cov, ["a", "b"])["p"] < 0.05)
    assert 0.029 <= np.mean(rejections) <= 0.071, np.mean(rejections)


def test_a_split_plot_design_is_read_and_analysed(tmp_path):
    from fetalscan.reader.design import Case, DesignConfig, create_design

    cases = [Case(f"n{i}", "normal", 0, []) for i in range(16)] + [Case(f"a{i}", "cyst", 1, []) for i in range(12)]
    design = create_design(cases, DesignConfig(readers=4, arms=("unaided", "concurrent"), design="split-plot"))
    truth = {c.case: c.truth for c in cases}
    rng = np.random.default_rng(0)
    rows = [(k + 2, {"reader": w["reader"], "treatment": w["arm"], "case": w["case"], "truth": str(truth[w["case"]]),
                     "rating": str(round(float(truth[w["case"]] + rng.normal(0, 0.8)), 3)),
                     "answer": "cyst" if rng.random() < 0.5 else "normal",
                     "seconds": str(round(float(rng.uniform(4, 30)), 1))})
            for k, w in enumerate(design.worklist)]
    reads = reads_from_rows(rows, source="worklist")
    assert reads.split_plot and reads.n_blocks == 2 and np.isnan(reads.ratings).sum() == 2 * 4 * 14
    res = analyze_reads(reads)
    assert res["design"].startswith("split-plot") and res["dbm"]["jackknife_pseudovalues"] is None
    assert np.isfinite(res["or"]["jackknife"]["rrrc"]["F"]) and res["time"]["method"] == "mixedlm"
    assert set(res["binary"]["sensitivity"]["per_reader"]["unaided"]["R1"]) == {"value", "ci", "n"}
    with pytest.raises(FetalscanError, match="split-plot pilot"):
        or_parameters_from_reads(reads)
    from fetalscan.reader.report import write_report

    html = write_report(tmp_path / "report.html", res, reads).read_text()
    assert "split-plot" in html and "DBM (jackknife pseudovalues)" not in html


def test_report_of_three_arms_lists_every_pair(tmp_path):
    from fetalscan.reader.report import write_report

    x, truth = _small(t=3, r=3, n0=15, n1=15)
    reads = Reads(["concurrent", "second-read", "unaided"], ["R1", "R2", "R3"], [f"c{k}" for k in range(30)], truth, x,
                  seconds=np.exp(np.random.default_rng(1).normal(2, 0.4, x.shape)))
    res = analyze_reads(reads)
    assert [(q["a"], q["b"]) for q in res["time"]["pairwise"]] == [
        ("concurrent", "second-read"), ("concurrent", "unaided"), ("second-read", "unaided")]
    html = write_report(tmp_path / "report.html", res, reads).read_text()
    assert "omnibus" in html and html.count("data:image/png;base64,") == 3 + 1 + 1  # 3 forests, ROC, times


def test_readers_sharing_only_some_cases_are_refused(tmp_path):
    rows = _good_rows()
    rows = [x for x in rows if not (x.startswith("r2,") and ",c0," in x)]  # r2 never read c0
    with pytest.raises(FetalscanError, match=r"readers 'r1' and 'r2' share 3 case\(s\) but not all"):
        load_reads(_write(tmp_path, rows))

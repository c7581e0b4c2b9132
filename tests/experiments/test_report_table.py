"""The ablation table (``table.md`` / ``.csv`` / ``.tex``): its statistics against scipy and hand
computations, and its layout on fake ``results.csv`` rows (no training here)."""
import csv
import json
import math
import re

import pytest
from scipy import stats as scipy_stats

from polytask.experiments import stats
from polytask.experiments.table import (SIGNIFICANT_MARK, build_table, markdown_table,
                                        read_example_scores, render_markdown)
from polytask.experiments.table_files import tex_escape, write_table

TASKS = {"copy": "exact_match", "reverse": "exact_match", "parity": "accuracy"}


def _rows(values: dict[tuple[str, str], list[float]]) -> list[dict[str, str]]:
    """results.csv rows from ``{(setting, task): [value per seed]}``."""
    return [{"combination": s, "seed": str(seed), "task": t, "value": repr(v)}
            for (s, t), vs in values.items() for seed, v in enumerate(vs)]


def _cells(table_md: str) -> dict[str, dict[str, str]]:
    """{setting: {header: cell}} of a markdown table."""
    lines = [line for line in table_md.splitlines() if line.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells))
            for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


# --- statistics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [[40.0, 44.0, 42.0], [1.0, 2.0], [3.5, 9.25, 0.0, 7.0, 7.0]])
def test_ci_half_width_is_the_t_interval_of_scipy(values):
    n = len(values)
    low, high = scipy_stats.t.interval(0.95, n - 1, loc=sum(values) / n,
                                       scale=scipy_stats.sem(values))
    assert stats.ci_half_width(values) == pytest.approx((high - low) / 2, rel=1e-12)


def test_ci_by_hand_and_none_for_one_seed():
    # 40, 44, 42: s = 2, t_{0.975, 2} = 4.302653 -> 4.302653 * 2 / sqrt(3) = 4.968
    assert stats.ci_half_width([40.0, 44.0, 42.0]) == pytest.approx(4.302653 * 2 / 3 ** 0.5,
                                                                     rel=1e-6)
    assert stats.ci_half_width([42.0]) is None
    assert stats.mean_ci([42.0]) == (42.0, None)


def test_delta_m_by_hand_with_a_lower_better_metric():
    # accuracy 60 vs 50: +20%; an error rate 8 vs 10 (lower better): -20% change, sign flipped
    # -> +20%; bleu 27 vs 30: -10%. Δm = (20 + 20 - 10) / 3 = 10.
    assert stats.lower_is_better("wer") and not stats.lower_is_better("accuracy")
    got = stats.delta_m([60.0, 8.0, 27.0], [50.0, 10.0, 30.0],
                        [stats.lower_is_better(m) for m in ("accuracy", "wer", "bleu")])
    assert got == pytest.approx(10.0)
    # the same numbers read as all higher-better give (20 - 20 - 10) / 3
    assert stats.delta_m([60.0, 8.0, 27.0], [50.0, 10.0, 30.0],
                         [False] * 3) == pytest.approx(-10 / 3)
    assert stats.delta_m([1.0], [0.0], [False]) is None       # relative change undefined
    with pytest.raises(ValueError, match="one of each per task"):
        stats.delta_m([1.0], [1.0, 2.0], [False])


def test_every_polytask_metric_has_a_known_direction():
    from polytask.core.metrics import METRICS
    assert all(stats.is_known(m) and not stats.lower_is_better(m) for m in METRICS)
    assert not stats.is_known("made-up")


@pytest.mark.parametrize("a, b", [([50.0, 47.0, 53.0], [40.0, 44.0, 42.0]),
                                  ([1.0, 2.0, 3.0, 4.0], [2.0, 2.5]), ([5.0, 5.0], [4.0, 6.0])])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # scipy on a side without spread
def test_welch_p_is_scipys(a, b):
    expected = scipy_stats.ttest_ind(a, b, equal_var=False).pvalue
    assert stats.welch_p(a, b) == pytest.approx(expected, rel=1e-12)


def test_welch_p_undefined_cases():
    assert stats.welch_p([1.0], [1.0, 2.0]) is None
    assert stats.welch_p([3.0, 3.0], [3.0, 3.0]) is None


def test_paired_bootstrap_separates_equal_from_different_examples():
    a = [100.0, 0.0, 100.0, 100.0, 0.0, 100.0] * 20
    assert stats.paired_bootstrap_p(a, a) == pytest.approx(1.0)
    better = [100.0] * len(a)                       # wins on every example a loses
    assert stats.paired_bootstrap_p(better, a, resamples=2000) < 0.01
    one_flip = list(a)
    one_flip[1] = 100.0                             # one example of 120 differs
    assert stats.paired_bootstrap_p(one_flip, a, resamples=2000) > 0.05
    with pytest.raises(ValueError, match="same examples"):
        stats.paired_bootstrap_p([1.0], [1.0, 2.0])


# --- the table ----------------------------------------------------------------------------------

NONE, HARD, SOFT = (f"sharing.strategy={s}" for s in ("none", "hard", "soft"))
DATA = {(NONE, "copy"): [40.0, 44.0, 42.0], (HARD, "copy"): [50.0, 47.0, 53.0],
        (SOFT, "copy"): [47.0, 46.0, 47.0],                    # p = 0.047: marked
        (NONE, "parity"): [80.0, 78.0, 82.0], (HARD, "parity"): [70.0, 75.0, 74.0],
        (SOFT, "parity"): [75.0, 76.0, 77.0]}                  # p = 0.055: not marked


def test_marks_exactly_where_welch_p_is_below_005():
    table = build_table(_rows(DATA), {"copy": "exact_match", "parity": "accuracy"})
    cells = _cells(render_markdown(table))
    marked = 0
    for s in (HARD, SOFT):
        for t in ("copy", "parity"):
            p = scipy_stats.ttest_ind(DATA[(s, t)], DATA[(NONE, t)], equal_var=False).pvalue
            header = next(h for h in cells[s] if h.startswith(t))
            assert cells[s][header].endswith(SIGNIFICANT_MARK) == (p < 0.05), (s, t, p)
            assert table.cells[(s, t)].p == pytest.approx(p)
            marked += p < 0.05
    assert marked == 3 and not any(SIGNIFICANT_MARK in c for c in cells[NONE].values())
    assert "Welch's t-test over seeds" in render_markdown(table)


def test_cells_show_mean_and_ci_and_delta_m():
    table_md = markdown_table(_rows(DATA), {"copy": "exact_match", "parity": "accuracy"})
    cells = _cells(table_md)
    ci = scipy_stats.t.ppf(0.975, 2) * 3.0 / 3 ** 0.5        # hard/copy: s = 3
    assert cells[HARD]["copy (exact_match)"] == f"**50.0 ± {ci:.1f}**‡"
    dm = 100 / 2 * ((50 - 42) / 42 + (73 - 80) / 80)
    assert cells[HARD]["Δm (%)"] == f"**{dm:+.2f}**" and cells[NONE]["Δm (%)"] == "baseline"
    assert "baseline: sharing.strategy=none with the same other settings" in table_md


def test_one_seed_says_n1_and_without_predictions_skips_the_mark():
    rows = _rows({k: v[:1] for k, v in DATA.items()})
    table_md = markdown_table(rows)
    assert _cells(table_md)[HARD]["copy"] == "**50.0 (n=1)**"
    assert SIGNIFICANT_MARK + " p" in table_md and "‡" not in "".join(
        c for row in _cells(table_md).values() for c in row.values())
    assert "no per-example scores (predictions.jsonl) to bootstrap" in table_md


def _prediction(task, i, score, template=0):
    """One predictions.jsonl record as experiments.evaluate writes it."""
    return {"task": task, "template": template, "source": f"s{i}", "reference": f"r{i}",
            "prediction": "p", "metric": "exact_match", "score": score}


def test_one_seed_with_predictions_uses_the_paired_bootstrap(tmp_path):
    base = [_prediction("copy", i, 100.0 * (i % 2)) for i in range(60)]
    hard = [_prediction("copy", i, 100.0) for i in range(60)]
    hard += [_prediction("copy", i, 0.0, template=1) for i in range(60)]   # not the main score
    corpus = [_prediction("parity", i, None) for i in range(60)]           # e.g. macro-F1
    scores = {}
    for setting, recs in ((NONE, base + corpus), (HARD, hard + corpus), (SOFT, base)):
        path = tmp_path / f"{setting}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        scores[(setting, "0")] = read_example_scores(path)
    assert read_example_scores(tmp_path / "absent.jsonl") is None
    assert set(scores[(HARD, "0")]) == {"copy"} and len(scores[(HARD, "0")]["copy"]) == 60
    assert sum(scores[(HARD, "0")]["copy"].values()) == 6000.0           # template 1 ignored
    rows = _rows({k: v[:1] for k, v in DATA.items()})
    table = build_table(rows, example_scores=scores)
    assert table.cells[(HARD, "copy")].test == "bootstrap"
    assert table.cells[(HARD, "copy")].p < 0.05 and table.cells[(SOFT, "copy")].p == 1.0
    assert table.cells[(HARD, "parity")].p is None          # parity has no per-example scores
    md = render_markdown(table)
    assert "paired bootstrap over test examples" in md
    assert "2 task cell(s) untested: no per-example scores for them" in md
    assert _cells(md)[HARD]["copy"].endswith("‡") and not _cells(md)[SOFT]["copy"].endswith("‡")


def test_malformed_prediction_record_is_named(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps(_prediction("copy", 0, 1.0)) + "\n" + '{"task": "copy"}\n')
    with pytest.raises(ValueError, match=r"predictions.jsonl:2: a prediction record needs"):
        read_example_scores(path)


def test_footnote_describes_the_grid_and_a_grid_without_a_none_row():
    rows = _rows({("weighting.method=static, sharing.strategy=hard", "copy"): [1.0, 2.0],
                  ("weighting.method=dwa, sharing.strategy=hard", "copy"): [3.0, 5.0]})
    grid = {"weighting.method": ["static", "dwa"], "sharing.strategy": ["hard"]}
    md = markdown_table(rows, grid=grid)
    assert ("Grid: weighting.method ∈ {static, dwa}; sharing.strategy ∈ {hard}; seeds {0, 1}, "
            "n=2 runs per setting") in md
    assert ("baseline: the first setting, weighting.method=static, sharing.strategy=hard "
            "(the grid has no sharing.strategy=none setting)") in md
    assert _cells(md)["weighting.method=dwa, sharing.strategy=hard"]["Δm (%)"] == \
        f"**{100 * (4 - 1.5) / 1.5:+.2f}**"   # the best (only) Δm: bold
    assert "Grid: sharing.strategy ∈ {none, hard, soft}; seeds {0, 1, 2}, n=3" in \
        markdown_table(_rows(DATA))                         # without grid: read from the labels
    no_strategy = markdown_table(_rows({("train.lr=0.1", "copy"): [1.0],
                                        ("train.lr=0.2", "copy"): [2.0]}))
    assert "the first setting, train.lr=0.1 (the grid does not vary sharing.strategy)" in \
        no_strategy


def test_baseline_matches_the_other_grid_values():
    data = {(f"sharing.strategy={s}, weighting.method={w}", "copy"): [v, v + 1]
            for s, w, v in (("none", "static", 10.0), ("none", "dwa", 20.0),
                            ("hard", "static", 15.0), ("hard", "dwa", 10.0))}
    table = build_table(_rows(data))
    assert table.baseline["sharing.strategy=hard, weighting.method=dwa"] == \
        "sharing.strategy=none, weighting.method=dwa"
    assert table.delta_m["sharing.strategy=hard, weighting.method=dwa"] == \
        pytest.approx(100 * (10.5 - 20.5) / 20.5)


def test_columns_follow_the_config_order_not_the_alphabet():
    rows = _rows({(NONE, t): [1.0] for t in ("parity", "copy", "reverse")})
    rows += [{"combination": NONE, "seed": "0", "task": "average", "value": "1.0"}]
    header = markdown_table(rows).splitlines()[0]
    assert header == "| setting | parity | copy | reverse | average |"       # first seen
    header = markdown_table(rows, TASKS).splitlines()[0]                    # the run's order
    assert header == ("| setting | copy (exact_match) | reverse (exact_match) | "
                      "parity (accuracy) | average |")


def test_lower_better_metric_is_marked_and_its_best_is_the_smallest():
    rows = _rows({(NONE, "asr"): [20.0, 22.0], (HARD, "asr"): [10.0, 12.0],
                  (NONE, "copy"): [50.0, 50.0], (HARD, "copy"): [60.0, 62.0]})
    table = build_table(rows, {"asr": "wer", "copy": "exact_match"})
    cells = _cells(render_markdown(table))
    assert cells[HARD]["asr (wer) ↓"].startswith("**11.0")
    assert table.delta_m[HARD] == pytest.approx(100 / 2 * ((21 - 11) / 21 + (61 - 50) / 50))
    assert "sign flipped where lower is better" in render_markdown(table)


def test_held_out_columns_are_marked_and_averaged_apart():
    data = {(s, t): [v, v + 2] for s, t, v in
            ((NONE, "copy", 40.0), (HARD, "copy", 60.0), (NONE, "reverse", 20.0),
             (HARD, "reverse", 20.0), (NONE, "parity", 50.0), (HARD, "parity", 25.0))}
    for s in (NONE, HARD):
        data[(s, "average_seen")] = [(a + b) / 2 for a, b in zip(data[(s, "copy")],
                                                                  data[(s, "reverse")])]
        data[(s, "average_held_out")] = data[(s, "parity")]
    table = build_table(_rows(data), TASKS, held_out=["parity"])
    md = render_markdown(table)
    header = md.splitlines()[0]
    assert "| parity† (accuracy) |" in header and "| copy (exact_match) |" in header
    assert header.endswith("| average_seen | average_held_out | Δm (%) | Δm held-out (%) |")
    # seen: copy +50%, reverse 0% -> +25; held-out: parity 51 -> 26 -> -49.02%
    assert table.delta_m[HARD] == pytest.approx(100 / 2 * ((61 - 41) / 41 + 0))
    assert table.delta_m_held[HARD] == pytest.approx(100 * (26 - 51) / 51)
    assert _cells(md)[HARD]["average_seen"].startswith("**41.0 ±")
    assert "† held out (parity)" in md


def test_table_tex_looks_compilable_and_table_csv_round_trips(tmp_path):
    data = {(f"{s}, train.lr_scale=1_0", t): v for (s, t), v in DATA.items()}
    data[(f"{SOFT}, train.lr_scale=1_0", "copy")] = [43.0]      # one seed: n=1, no ci
    table = build_table(_rows(data), {"copy": "exact_match", "parity": "accuracy"},
                        examples={"copy": 5})
    paths = write_table(table, tmp_path)
    tex = paths["table_tex"].read_text()
    assert tex.count("{") == tex.count("}") and tex.count("$") % 2 == 0
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"\end{table}"):
        assert tex.count(rule) == 1, rule
    assert not re.search(r"(?<!\\)[_%&#]", tex.replace(" & ", " ")), "unescaped character"
    assert r"exact\_match" in tex and r"lr\_scale=1\_0" in tex and r"\textbf{" in tex
    assert r"\caption{Grid:" in tex and "±" not in tex and "‡" not in tex
    body = [line for line in tex.splitlines() if line.endswith(r"\\")]
    assert len({line.count(" & ") for line in body}) == 1          # every row: same columns
    with open(paths["table_csv"], newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["setting"] for r in back] == table.settings
    for r in back:
        for c in table.columns:
            cell = table.cells[(r["setting"], c)]
            assert float(r[f"{c}.mean"]) == cell.mean and int(r[f"{c}.n"]) == len(cell.values)
            assert (r[f"{c}.ci"] == "") == (cell.ci is None)
            assert cell.ci is None or float(r[f"{c}.ci"]) == cell.ci
            assert cell.p is None or float(r[f"{c}.p"]) == cell.p
        d = table.delta_m[r["setting"]]
        assert (r["delta_m"] == "" and d is None) or float(r["delta_m"]) == d
    assert math.isclose(float(back[1]["copy.p"]), scipy_stats.ttest_ind(
        DATA[(HARD, "copy")], DATA[(NONE, "copy")], equal_var=False).pvalue)
    assert paths["table"].read_text() == render_markdown(table)


def test_unknown_metric_direction_is_named():
    md = markdown_table(_rows(DATA), {"copy": "made-up", "parity": "accuracy"})
    assert "Direction unknown, taken as higher-better: copy (made-up)." in md


def test_zero_baseline_gives_no_delta_m_and_says_why():
    md = markdown_table(_rows({(NONE, "copy"): [0.0, 0.0], (HARD, "copy"): [5.0, 7.0]}))
    assert _cells(md)[HARD]["Δm (%)"] == "–" and "a baseline value is 0" in md
    same = markdown_table(_rows({
        (NONE, "copy"): [1.0, 1.0], (HARD, "copy"): [1.0, 1.0],
        (NONE, "parity"): [1.0, 2.0], (HARD, "parity"): [5.0, 6.0]}))
    assert "1 cell(s) not tested: the same value in every seed on both sides." in same
    assert "Welch's t-test over seeds" in same and "‡" in _cells(same)[HARD]["parity"]


def test_tex_escape():
    assert tex_escape("a_b & 50% #1 {x} ~^\\") == \
        r"a\_b \& 50\% \#1 \{x\} \textasciitilde{}\textasciicircum{}\textbackslash{}"


def test_a_row_with_keys_of_its_own_compares_with_the_plain_baseline():
    from polytask.experiments.table import baselines
    settings = ["sharing.strategy=none", "sharing.strategy=hard",
                "sharing.strategy=hard, sharing.adapters={per: task}",
                "sharing.strategy=merged (ties)"]
    base, note = baselines(settings)
    assert set(base.values()) == {"sharing.strategy=none"} and len(base) == 4
    assert note == "baseline: sharing.strategy=none with the same other settings"
    base, _ = baselines(settings[1:])   # no baseline row at all: the first setting
    assert set(base.values()) == {"sharing.strategy=hard"}

"""``polytask bench weighting`` at the toy size: the loop's real step runs for each method, the
JSON holds the figures the issue asks for (time and memory relative to static, extra MiB next
to k x shared MiB), and bad options are one-line errors. No timing is asserted."""
import json

import pytest

from polytask import losses
from polytask.experiments import bench, cli
from polytask.experiments.bench.weighting import (MIB, check_methods, format_table, run,
                                                  write_tasks)

ROW_KEYS = {"method", "k", "step_s", "step_s_all", "tokens_per_s", "params", "shared_params",
            "state_bytes", "step_bytes", "peak_bytes", "time_ratio", "memory_ratio",
            "extra_mib", "k_shared_mib", "extra_in_k_shared"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "weighting.json"
    bench.main(["weighting", "--size", "toy", "--tasks", "2", "--methods", "pcgrad", "static",
                "--steps", "1", "--rounds", "1", "--warmup", "0", "--examples", "32",
                "--json", str(path)])
    return json.loads(path.read_text())


def test_json_holds_every_figure(result):
    assert result["methods"] == ["static", "pcgrad"]          # the reference first
    assert result["tasks"] == [2] and result["errors"] == {}
    assert result["model"]["d_model"] == 32 and result["batch"] == 8
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"static", "pcgrad"}
    for r in rows.values():
        assert set(r) == ROW_KEYS and r["k"] == 2
        for key in ("step_s", "tokens_per_s", "state_bytes", "step_bytes", "time_ratio",
                    "memory_ratio", "k_shared_mib"):
            assert r[key] > 0, (r["method"], key)
        assert r["peak_bytes"] == r["state_bytes"] + r["step_bytes"]
        assert 0 < r["shared_params"] < r["params"]        # heads are private
        # the step ends holding a gradient for every trainable parameter
        assert r["step_bytes"] >= 4 * r["params"], r["method"]
        assert r["k_shared_mib"] == pytest.approx(2 * r["shared_params"] * 4 / MIB)
    static, pcgrad = rows["static"], rows["pcgrad"]
    assert static["time_ratio"] == static["memory_ratio"] == 1 and static["extra_mib"] == 0
    assert pcgrad["time_ratio"] == pytest.approx(pcgrad["step_s"] / static["step_s"])
    # PCGrad holds the per-task gradients over the shared parameters: more than static
    assert pcgrad["extra_mib"] == pytest.approx(
        (pcgrad["peak_bytes"] - static["peak_bytes"]) / MIB) and pcgrad["extra_mib"] > 0


def test_table_is_method_by_k(result):
    table = format_table(result)
    assert "| weighting | k=2 |" in table and "| static | " in table
    assert "| pcgrad | " in table and "| k x shared MiB | " in table


def test_default_methods_are_the_registry_with_static_first():
    methods = check_methods(None)
    assert methods[0] == "static" and sorted(methods) == losses.WEIGHTINGS.names()


@pytest.mark.parametrize("args,message", [
    (["--methods", "static", "nope"], "unknown weighting 'nope'; known: "),
    (["--size", "huge"], "unknown --size 'huge'; choose one of default, toy"),
    (["--size", "toy", "--tasks", "9"], "--tasks 9: k must be between 1 and the batch size (8)"),
    (["--size", "toy", "--tasks", "2", "--rounds", "0"], "--rounds (0)"),
])
def test_bad_options_are_one_line_errors(args, message, capsys):
    assert cli.main(["bench", "weighting", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("polytask: error: ") and message in err and err.count("\n") == 1
    if "unknown weighting" in message:
        assert all(name in err for name in losses.WEIGHTINGS.names())


def test_generated_tasks_mix_kinds_with_distinct_instructions(tmp_path):
    from polytask.core.data.task_data import read_records
    specs = write_tasks(8, tmp_path, examples=3)
    assert len({s["name"] for s in specs}) == 8
    assert {s["kind"] for s in specs[:2]} == {"generation", "classification"}
    instructions = [next(read_records(s["files"]["train"]))[1]["instruction"] for s in specs]
    assert len(set(instructions)) == 8 and instructions[6].startswith("Task 6: ")
    assert all(sum(1 for _ in read_records(s["files"]["train"])) == 3 for s in specs)


def test_a_broken_method_is_reported_and_the_others_measured(monkeypatch):
    def broken(task_names, **options):
        raise RuntimeError("cannot build\nthis weighting")
    monkeypatch.setitem(losses.WEIGHTINGS._entries, "broken", broken)
    result = run([2], ["broken", "static"], size="toy", examples=16, warmup=0, rounds=1, steps=1)
    assert [r["method"] for r in result["rows"]] == ["static"]
    assert result["errors"] == {"broken k=2": "RuntimeError: cannot build this weighting"}
    table = format_table(result)
    assert "| broken | error |" in table
    assert "error: broken k=2: RuntimeError: cannot build this weighting" in table

"""``polytask bench memory`` at a toy size: every weighting is measured, the table and JSON are
well formed, and the measured bytes respect the bounds that follow from what a step holds.
No timing is asserted."""
import json

import pytest

from polytask import losses
from polytask.experiments import bench
from polytask.experiments.bench.memory import Size, format_table, mixed_batch, run

TOY = Size(d_model=32, layers=1, d_ff=64, vocab=200, batch=6, length=8, tasks=3)


@pytest.fixture(scope="module")
def result():
    return run(TOY)


def test_every_weighting_is_measured_once(result):
    names = [r["weighting"] for r in result["rows"]]
    assert sorted(names) == losses.WEIGHTINGS.names() and names[0] == "static"
    assert result["size"]["tasks"] == 3 and result["n_heads"] == 1
    table = format_table(result)
    assert table.count("\n") == len(names) + 3 and "| pcgrad |" in table


def test_bytes_respect_what_a_step_holds(result):
    for r in result["rows"]:
        assert 0 < r["last_shared_params"] < r["shared_params"] <= r["params"]
        # between steps: fp32 parameters + AdamW's two fp32 moments, and a few scalars
        # (DB-MTL also keeps its moving average of the k task gradients on the shared ones)
        held = 4 * TOY.tasks * r["shared_params"] if r["weighting"] == "db_mtl" else 0
        assert 12 * r["params"] + held <= r["state_bytes"] < 12 * r["params"] + held + 4096, \
            r["weighting"]
        # the step ends holding a gradient for every trainable parameter
        assert r["step_bytes"] >= 4 * r["params"], r["weighting"]
        assert r["peak_bytes"] == r["state_bytes"] + r["step_bytes"]
        assert r["bytes_per_param"] == pytest.approx(r["peak_bytes"] / r["params"])


def test_per_task_gradients_cost_what_they_hold(result):
    rows = {r["weighting"]: r for r in result["rows"]}
    static = rows["static"]
    k_p4 = TOY.tasks * static["shared_params"] * 4       # k flat fp32 vectors over P_shared
    # PCGrad holds the k per-task gradients over every shared parameter (and their surgery)
    assert rows["pcgrad"]["extra_bytes"] >= k_p4
    assert rows["pcgrad"]["extra_in_kp4"] == pytest.approx(rows["pcgrad"]["extra_bytes"] / k_p4)
    # GradNorm's per-task gradients are over W (the last shared encoder layer) only, taken
    # before the same backward static runs: never below static
    assert rows["gradnorm"]["extra_bytes"] >= 0
    # one weighted sum, one backward: no per-task gradients
    for name in ("uncertainty", "dwa", "famo"):
        assert abs(rows[name]["extra_bytes"]) < 0.05 * k_p4, name


def test_mixed_batch_gives_every_task_rows():
    batch = mixed_batch(TOY)
    assert batch.task_ids.tolist() == [0, 1, 2, 0, 1, 2]
    assert batch.src.shape == batch.labels.shape == (6, 8) and bool(batch.tgt_mask.all())
    with pytest.raises(ValueError, match="tasks"):
        Size(batch=2, tasks=3)


def test_cli_writes_json(tmp_path, capsys):
    path = tmp_path / "memory.json"
    bench.main(["memory", "--d-model", "16", "--layers", "1", "--d-ff", "32", "--vocab", "64",
                "--batch", "2", "--length", "4", "--tasks", "2",
                "--weightings", "static", "pcgrad", "--json", str(path)])
    assert "| pcgrad |" in capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert [r["weighting"] for r in saved["rows"]] == ["static", "pcgrad"]

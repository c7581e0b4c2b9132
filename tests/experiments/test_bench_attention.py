"""Smoke test of ``python -m polytask.experiments.bench.attention`` at toy sizes: every backend runs
forward + backward, the table is well formed and the ratios are relative to sdpa. No timing is
asserted (speed is measured, never tested)."""
import pytest

from polytask.experiments.bench.attention import format_table, main, run


@pytest.mark.slow  # the profiler's first start takes seconds on a busy machine
def test_attention_benchmark_rows_and_table(capsys):
    rows = run([24, 40], batch=1, heads=2, dim=8, repeats=1, block_sizes=[16, 64])
    assert [(r["backend"], r["L"]) for r in rows] == [
        (name, length) for length in (24, 40)
        for name in ("reference", "chunked/16", "chunked/64", "sdpa")]
    for r in rows:
        assert r["ms"] > 0 and r["peak_mib"] > 0
    sdpa = [r for r in rows if r["backend"] == "sdpa"]
    assert all(r["speed_vs_sdpa"] == 1.0 and r["memory_vs_sdpa"] == 1.0 for r in sdpa)
    assert format_table(rows).count("\n") == len(rows) + 1
    main(["--lengths", "16", "--batch", "1", "--heads", "1", "--dim", "4", "--repeats", "1",
          "--backends", "chunked", "sdpa"])
    assert "| chunked/64 | 16 |" in capsys.readouterr().out

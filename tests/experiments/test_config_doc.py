"""docs/config.md is generated and complete; ``--print-config``; ``bench --help`` and a bench
without profiler noise; a tokenizer vocabulary that adapts to a small corpus (issue #24)."""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml

from polytask.core.data.tokenizer import Tokenizer
from polytask.core.model.fields import bounds
from polytask.core.peft.options import OPTIONS as PEFT_OPTIONS
from polytask.experiments import config_doc
from polytask.experiments.cli import main
from polytask.experiments.config import RunConfig, load_config
from polytask.losses import LOSSES, WEIGHTINGS
from polytask.losses.registry import accepted_options

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "experiments" / "configs" / "tiny.yaml"
QUICK = ROOT / "experiments" / "configs" / "quick.yaml"


# --- docs/config.md -------------------------------------------------------------------------
def test_docs_config_md_is_current():
    written = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert written == config_doc.render(), (
        f"docs/config.md is stale; regenerate it: {config_doc.COMMAND}")


def _classes() -> list[tuple[str, type]]:
    return ([("", RunConfig)] + config_doc.SECTIONS
            + [("train.peft", c) for c in dict.fromkeys(PEFT_OPTIONS.values())])


@pytest.mark.parametrize("section,cls", _classes(), ids=lambda x: getattr(x, "__name__", x))
def test_every_field_appears_with_a_description(section, cls):
    text = config_doc.render()
    docs = config_doc.field_docs(cls)
    for f in dataclasses.fields(cls):
        key = f"{section}.{f.name}" if section else f.name
        assert f"| `{key}` |" in text, key
        assert docs[f.name].strip(), f"{cls.__name__}.{f.name} has no description"


def test_every_registered_loss_and_weighting_option_appears():
    text = config_doc.render()
    for registry, where, positional in ((LOSSES, "losses.NAME", 0),
                                        (WEIGHTINGS, "weighting.options", 1)):
        for name in registry.names():
            assert f"#### `{name}`" in text, name
            for option in accepted_options(registry.get(name), positional)[0]:
                if option != "gradient_reducer":
                    assert f"| `{where}.{option}` |" in text, (name, option)
    assert "gradient_reducer` |" not in text


@dataclass
class _Toy:
    """A toy config.

    Fields:
        from_doc: described in the docstring,
            over two lines.
    """

    from_doc: int = 1
    trailing: float = field(default=0.5, metadata=bounds(ge=0, lt=1))  # at the end
    # above the declaration
    above: Literal["a", "b"] = "a"
    # above,
    both: int | None = field(default=None, metadata=bounds(gt=0, null="no limit"))  # and after
    meta: list[float] = field(default_factory=lambda: [1.0], metadata={"doc": "from metadata"})
    bare: bool = False


def test_descriptions_come_from_docstring_comments_and_metadata():
    assert config_doc.field_docs(_Toy) == {
        "from_doc": "described in the docstring, over two lines.", "trailing": "at the end",
        "above": "above the declaration", "both": "above,; and after",
        "meta": "from metadata", "bare": ""}


def test_rows_give_type_default_and_allowed_values():
    rows = {r[0]: r[1:4] for r in config_doc.dataclass_rows("toy", _Toy)}
    assert rows["`toy.trailing`"] == ("float", "`0.5`", "in [0, 1)")
    assert rows["`toy.above`"] == ("str", "`a`", "`a`, `b`")
    assert rows["`toy.both`"] == ("int or null", "`null`", "positive; null: no limit")
    assert rows["`toy.meta`"] == ("list[float]", "`[1.0]`", "")
    assert rows["`toy.bare`"] == ("bool", "`false`", "")


def test_docs_are_linked():
    assert "docs/config.md" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(config.md)" in (ROOT / "docs" / "README.md").read_text(encoding="utf-8")


# --- --print-config ---------------------------------------------------------------------------
def test_train_print_config_resolves_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(TINY), "train.lr=0.001", "sharing.strategy=soft",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 0.001 and printed["sharing"]["strategy"] == "soft"
    assert printed["train"]["grad_accum"] == 1          # a default the file does not set
    assert printed == load_config(TINY, ["train.lr=0.001", "sharing.strategy=soft"]).to_dict()
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))   # it is a valid config
    assert load_config(tmp_path / "printed.yaml").to_dict() == printed
    assert list(tmp_path.iterdir()) == [tmp_path / "printed.yaml"]   # no run directory


def test_train_print_config_reports_a_bad_override(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(TINY), "train.lr=-1", "--print-config"]) == 2
    assert "train.lr = -1.0 must be positive" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_ablate_print_config_gives_base_grid_and_seeds(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["ablate", str(QUICK), "seeds=[4, 5]", "grid.train.lr=[0.1, 0.2]",
                 "train.max_steps=3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seeds"] == [4, 5]
    assert printed["grid"] == {"sharing.strategy": ["none", "hard", "soft", "hierarchical"],
                               "train.lr": [0.1, 0.2]}
    assert printed["train"]["max_steps"] == 3 and printed["data"]["vocab_size"] == 400
    assert list(tmp_path.iterdir()) == []


# --- bench --help and profiler noise ---------------------------------------------------------
def test_bench_help_lists_benchmarks_and_their_options(capsys):
    from polytask.experiments.bench import SUBCOMMANDS
    from polytask.experiments.bench import main as bench_main
    assert bench_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"polytask bench {name}" in out for name in SUBCOMMANDS)
    with pytest.raises(SystemExit) as exit_:
        bench_main(["attention", "--help"])
    assert exit_.value.code == 0
    assert "usage: polytask bench attention" in capsys.readouterr().out


def _usdt_from_a_bare_profiler() -> bool:
    """Whether this torch's profiler writes USDT lines to fd 2 (what the test guards)."""
    from torch.profiler import ProfilerActivity, profile
    read, write = os.pipe()
    saved = os.dup(2)
    os.dup2(write, 2)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
            torch.ones(4) + 1
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(write)
    with os.fdopen(read, "rb") as fh:
        return b"USDT:" in fh.read()


def test_attention_bench_stderr_has_no_profiler_lines(capfd):
    from polytask.experiments.bench import attention, quiet_profiler
    noisy = _usdt_from_a_bare_profiler()
    attention.main(["--lengths", "8", "--batch", "1", "--heads", "1", "--dim", "4",
                    "--repeats", "1", "--backends", "reference"])
    with quiet_profiler():   # other output in the block still reaches stderr
        print("kept", file=sys.stderr)
        os.write(2, b"USDT: dropped\n")
    out, err = capfd.readouterr()
    assert "reference" in out and "kept" in err
    assert "USDT" not in err, err
    if not noisy:
        pytest.skip("this torch's profiler prints no USDT lines; only the filter was checked")


# --- the tokenizer's vocabulary fits a small corpus -------------------------------------------
CORPUS = [f"the cat {i} sat on mat {i % 7}" for i in range(40)]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_vocab_size_shrinks_to_what_the_corpus_supports(model_type, capfd):
    with pytest.raises(ValueError) as err:
        Tokenizer.train(CORPUS, vocab_size=1000, model_type=model_type, fit_vocab=False)
    largest = int(str(err.value).split("value <= ")[1].split(".")[0])
    tok = Tokenizer.train(CORPUS, vocab_size=1000, model_type=model_type)
    assert tok.vocab_size == largest < 1000
    assert tok.decode(tok.encode(CORPUS[3])) == CORPUS[3]
    err_text = capfd.readouterr().err
    assert err_text.count("polytask: note:") == 1
    assert (f"polytask: note: data.vocab_size 1000 is more than this corpus supports; using "
            f"{largest}") in err_text


def test_vocab_size_that_fits_is_kept_silently(capfd):
    assert Tokenizer.train(CORPUS, vocab_size=30).vocab_size == 30
    assert "note" not in capfd.readouterr().err


def test_a_corpus_too_small_for_the_special_ids_still_fails():
    with pytest.raises(ValueError, match="Raise data.vocab_size"):
        Tokenizer.train(["abcdefgh"], vocab_size=6)


# --- the README's onnxruntime example runs and agrees with `polytask generate` ----------------
def _readme_block(after: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("```python\n", text.index(after)) + len("```python\n")
    return text[start:text.index("```", start)]


@pytest.mark.slow
def test_readme_onnx_example_equals_generate(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime", reason="extra [onnx]")
    pytest.importorskip("onnx", reason="extra [onnx]")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "tiny"
    assert main(["train", str(TINY), "train.max_steps=2", "train.eval_every=2",
                 "data.eval_examples=4", "data.test_examples=4", "--out", str(run),
                 "--no-progress"]) == 0
    assert main(["export", str(run), "--onnx", "onnx"]) == 0
    assert main(["generate", str(run), "--task", "reverse", "--input", "3 1 4"]) == 0
    capsys.readouterr()   # the run's output, then generate's (compared below, rerun quietly)
    assert main(["generate", str(run), "--task", "reverse", "--input", "3 1 4"]) == 0
    expected = capsys.readouterr().out
    exec(compile(_readme_block("### Export to ONNX"), "README.md", "exec"), {})
    assert capsys.readouterr().out == expected

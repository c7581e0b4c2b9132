"""The ablation table's files: ``table.csv`` and ``table.tex`` beside ``table.md``.

:func:`table_csv_rows` flattens a :class:`polytask.experiments.table.Table` to one CSV row per
setting (mean, ci, n and p per column, then Δm; floats in full so the file round-trips);
:func:`render_latex` renders it as a booktabs table, escaping text with :func:`tex_escape`
(LaTeX's special characters, the table's symbols in math mode); :func:`write_table` writes all
three files. The statistics and the markdown rendering are in :mod:`polytask.experiments.table`.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from polytask.experiments import stats
from polytask.experiments.table import Table, _delta_text, _header, render_markdown


def table_csv_rows(table: Table) -> list[dict[str, Any]]:
    """``table.csv``: one row per setting; per column its mean, ci, n and p (empty where
    undefined), then Δm. Floats are written in full (``repr``), so the file round-trips."""
    out = []
    for s in table.settings:
        row: dict[str, Any] = {"setting": s, "baseline": table.baseline.get(s, "")}
        for c in table.columns:
            cell = table.cells.get((s, c))
            row.update({f"{c}.mean": cell and cell.mean, f"{c}.ci": cell and cell.ci,
                        f"{c}.n": cell and len(cell.values), f"{c}.p": cell and cell.p})
        row["delta_m"] = table.delta_m.get(s)
        if table.held:
            row["delta_m_held_out"] = table.delta_m_held.get(s)
        out.append({k: "" if v is None else repr(v) if isinstance(v, float) else v
                    for k, v in row.items()})
    return out


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        "±": r"$\pm$", "†": r"$^\dagger$", "‡": r"$^\ddagger$", "Δ": r"$\Delta$",
        "∈": r"$\in$", "−": "-", "–": "--", "↓": r"$\downarrow$", "<": r"$<$", ">": r"$>$"}


def tex_escape(text: str) -> str:
    """``text`` as LaTeX source: special characters escaped, the table's symbols in math."""
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def render_latex(table: Table) -> str:
    """``table.tex``: a booktabs table (needs ``\\usepackage{booktabs}``), best mean bold,
    significance marks as superscripts, the footnotes as the caption."""
    def cell(s: str, c: str) -> str:
        x = table.cells.get((s, c))
        if x is None:
            return "--"
        text = f"{x.mean:.1f}" + (r" ($n{=}1$)" if x.ci is None else rf" $\pm$ {x.ci:.1f}")
        best = table.best(c)
        if best is not None and abs(x.mean - best) < 1e-9:
            text = rf"\textbf{{{text}}}"
        return text + (r"$^\ddagger$" if stats.significant(x.p) else "")

    def delta(s: str, held: bool = False) -> str:
        text = _delta_text(table, s, held)
        plain = tex_escape(text.strip("*"))
        return rf"\textbf{{{plain}}}" if text.startswith("**") else plain

    header = ["setting"] + [_header(table, c) for c in table.columns]
    if table.compared:
        header += ["Δm (%)"] + (["Δm held-out (%)"] if table.held else [])
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(tex_escape(h) for h in header) + r" \\", r"\midrule"]
    for s in table.settings:
        out = [tex_escape(s)] + [cell(s, c) for c in table.columns]
        if table.compared:
            out += [delta(s)] + ([delta(s, True)] if table.held else [])
        lines.append(" & ".join(out) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}",
              r"\caption{" + tex_escape(" ".join(table.footnotes)) + "}",
              r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(table: Table, out: str | Path) -> dict[str, Path]:
    """``table.md``, ``table.csv`` and ``table.tex`` in ``out``; returns their paths."""
    out = Path(out)
    paths = {"table": out / "table.md", "table_csv": out / "table.csv",
             "table_tex": out / "table.tex"}
    paths["table"].write_text(render_markdown(table))
    rows = table_csv_rows(table)
    with open(paths["table_csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["setting"])
        w.writeheader()
        w.writerows(rows)
    paths["table_tex"].write_text(render_latex(table))
    return paths

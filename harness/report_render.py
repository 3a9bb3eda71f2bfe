"""The report's tables as a reader sees them: human column names, the precision that means
something, the best value per column in bold, FAIL / OOM / n/a marked; written as Markdown,
LaTeX (booktabs, through pandas ``Styler.to_latex``) and HTML (a jinja2 page).

harness.report computes the tables (strings with their numbers first, e.g. ``82.0 ± 2.0``);
this module only presents them. Which cell is best is read from the leading number of each
cell, in the direction the column names (higher accuracy and steps/s, lower bpc, memory and
exponents).
"""

from __future__ import annotations

import datetime as dt
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
# cell text -> CSS class (HTML) of a cell that holds no number
STATUS_CLASSES = {"FAIL": "fail", "OOM": "oom", "n/a": "na", "–": "notrun", "no metric": "fail",
                  "holds": "holds", "differs": "differs", "not run": "notrun"}
LATEX_LINES_PER_TABLE = 32  # a taller table is split into parts that each fit a page
WRAP_CHARS = 30  # about the characters of one line of a wrapped (p{5cm}) column
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?")


@dataclass
class DisplayTable:
    """One table of the report, ready to render.

    Attributes:
        text: the cells as strings; the index holds row labels (``row_label`` names them) or is a
            plain RangeIndex that is never shown.
        title: the section title; ``caption`` says what the numbers are.
        better: column name -> ``"max"`` or ``"min"``, the columns whose best cell is bold.
        groups: a column whose values split the rows into groups compared separately (e.g. the
            efficiency table's ``setup``), or None.
        latex_drop: columns left out of the LaTeX version (long notes).
    """

    text: pd.DataFrame
    title: str
    caption: str
    name: str
    row_label: str | None = None
    better: dict[str, str] = field(default_factory=dict)
    groups: str | None = None
    latex_drop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.row_label is not None and not self.text.index.is_unique:
            # e.g. one model under two setups: the labels become a column (Styler needs unique ones)
            self.text = self.text.rename_axis(self.row_label).reset_index()
            self.row_label = None

    @property
    def empty(self) -> bool:
        return self.text.empty

    def best(self) -> pd.DataFrame:
        """A boolean frame: True where a cell holds its column's best number (ties all bold)."""
        mask = pd.DataFrame(False, index=self.text.index, columns=self.text.columns)
        for column, how in self.better.items():
            if column not in self.text:
                continue
            values = self.text[column].map(leading_number)
            keys = self.text[self.groups] if self.groups in self.text else pd.Series(0, index=values.index)
            for _, part in values.groupby(keys):
                part = part.dropna()
                if len(part) < 2:
                    continue  # one number is not a comparison
                target = part.max() if how == "max" else part.min()
                mask.loc[part.index[np.isclose(part, target)], column] = True
        return mask

    def classes(self) -> pd.DataFrame:
        """CSS classes per cell: the status ones, ``best``, and ``text`` for columns of words
        (left-aligned and wrapped, where numbers are right-aligned)."""
        status = self.text.map(lambda v: STATUS_CLASSES.get(str(v), ""))
        best = self.best().map(lambda b: "best" if b else "")
        words = pd.DataFrame({c: [_column_spec(self.text[c]) != "r"] * len(self.text)
                              for c in self.text.columns}, index=self.text.index)
        return (status + " " + best + " " + words.map(lambda w: "text" if w else "")).map(
            lambda c: " ".join(c.split()))


def leading_number(text) -> float:
    """The number a cell starts with (``"82.0 ± 2.0"`` -> 82.0), NaN when it starts with none."""
    match = _NUMBER.match(str(text).replace(",", ""))
    return float(match.group(0)) if match else np.nan


# --------------------------------------------------------------------------- Markdown


def to_markdown(table: DisplayTable) -> str:
    if table.empty:
        return "_no data_\n"
    best = table.best()
    frame = table.text.copy()
    frame = frame.where(~best, "**" + frame.astype(str) + "**")
    if table.row_label is not None:
        frame.insert(0, table.row_label, frame.index.astype(str))
    header = [str(c) for c in frame.columns]
    rows = [[str(v).replace("|", "\\|") for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


# --------------------------------------------------------------------------- LaTeX

_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """Text as LaTeX source: special characters escaped, ± and – as math and en dash."""
    text = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))
    return (text.replace("±", r"$\pm$").replace("10⁹", r"$10^9$").replace("–", "--").replace("−", "$-$")
            .replace("×", r"$\times$").replace("≥", r"$\geq$").replace("≤", r"$\leq$")
            .replace("▲", r"$\triangle$").replace("†", r"\dag{}"))


def to_latex(table: DisplayTable, label: str) -> str:
    """booktabs tables (``\\usepackage{booktabs,graphicx,array}``) that fit a page: each a ``table*``
    whose tabular is shrunk to the text width when wider (``\\resizebox``), and split into parts
    of at most :data:`LATEX_LINES_PER_TABLE` lines (a wrapped cell counts its lines); best per
    column in bold."""
    if table.empty:
        return f"% {table.title}: no data\n"
    text = table.text.drop(columns=[c for c in table.latex_drop if c in table.text])
    best = table.best()[text.columns]
    parts = _row_parts(text)
    out = []
    for k, rows in enumerate(parts):
        part, bold = text.iloc[rows], best.iloc[rows]
        if table.row_label is None:
            part = part.reset_index(drop=True)
            bold = bold.reset_index(drop=True)
        styler = part.style.format(latex_escape).format_index(latex_escape, axis=0) \
            .format_index(latex_escape, axis=1)
        styler = styler.apply(lambda _: bold.map(lambda b: "font-weight: bold;" if b else ""),
                              axis=None)
        if table.row_label is None:
            styler = styler.hide(axis="index")
        caption = table.caption if len(parts) == 1 else \
            f"{table.caption} (part {k + 1} of {len(parts)})"
        tabular = styler.to_latex(hrules=True, convert_css=True,
                                  column_format=("l" if table.row_label is not None else "")
                                  + "".join(_column_spec(text[c]) for c in part.columns))
        out += [r"\begin{table*}[tp]", r"\centering",
                rf"\caption{{{latex_escape(table.title)}. {latex_escape(caption)}}}",
                rf"\label{{{label}{'' if len(parts) == 1 else f'-{k + 1}'}}}",
                r"\resizebox{\ifdim\width>\textwidth\textwidth\else\width\fi}{!}{%",
                tabular.rstrip("\n") + "}", r"\end{table*}", ""]
    return "\n".join(out)


def _row_parts(text: pd.DataFrame) -> list[slice]:
    """Consecutive rows whose printed lines (the tallest wrapped cell of each) fit one page."""
    wrapped = [c for c in text.columns if _column_spec(text[c]).endswith("p{5cm}")]
    lines = [max([1] + [-(-len(str(text.iloc[i][c])) // WRAP_CHARS) for c in wrapped])
             for i in range(len(text))]
    parts, start, used = [], 0, 0
    for i, n in enumerate(lines):
        if used + n > LATEX_LINES_PER_TABLE and i > start:
            parts.append(slice(start, i))
            start, used = i, 0
        used += n
    return parts + [slice(start, len(text))]


def _column_spec(values: pd.Series) -> str:
    """Numbers right-aligned; words left-aligned; sentences (claims, notes) wrapped ragged-right
    in a fixed-width column (``array`` package) instead of one endless line."""
    if values.map(leading_number).isna().mean() <= 0.5:
        return "r"
    if values.astype(str).str.len().max() > 30:
        return r">{\raggedright\arraybackslash}p{5cm}"
    return "l"


# --------------------------------------------------------------------------- HTML


def to_html(table: DisplayTable) -> str:
    """One ``<table>`` (pandas Styler): row labels as header cells, no index artefacts, CSS
    classes for status and best cells."""
    if table.empty:
        return "<p><em>no data</em></p>"
    escape = lambda v: html.escape(str(v))  # noqa: E731
    styler = table.text.style.set_td_classes(table.classes()).format(escape) \
        .format_index(escape, axis=0).format_index(escape, axis=1)
    if table.row_label is None:
        styler = styler.hide(axis="index")
    # the table's id is Styler's: T_<name>; its (empty) <style> block stays, the classes need it
    return styler.set_table_attributes('class="results"').to_html(table_uuid=table.name)


def render_page(*, title: str, header: dict[str, str], tables: list[DisplayTable],
                figures: list[dict], notes: list[str]) -> str:
    """The self-contained report page (templates/report.html.j2): the header facts, one section
    per table, the figures embedded as PNG data (their PDFs linked)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.StrictUndefined)
    sections = [{"title": t.title, "caption": t.caption, "name": t.name,
                 "html": to_html(t)} for t in tables]
    return env.get_template("report.html.j2").render(
        title=title, header=header, sections=sections, figures=figures, notes=notes,
        generated=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

"""A report as a list of blocks, written twice: `report.md` beside its PNG files, and one
self-contained `report.html` with the same text, tables and figures.

A block is a line of Markdown (`str`: headings, paragraphs, `- ` lists, `*em*`, `**strong**`,
`` `code` `` and links, the little Markdown the report writes), a `Table` (a DataFrame) or an
`Image` (PNG bytes). The HTML page renders tables with pandas' `to_html` and embeds each image as
a base64 data URI, so it loads nothing from outside itself.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Table:
    """A table of the report; numbers shown with `digits` decimals."""

    frame: pd.DataFrame
    digits: int = 3


@dataclass(frozen=True)
class Image:
    """A figure of the report: `name` is its PNG file beside report.md, `png` its bytes."""

    name: str
    caption: str
    png: bytes


Block = str | Table | Image


def markdown(blocks: list[Block]) -> str:
    """The report as GitHub-flavoured Markdown; images link to their PNG files."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Table):
            lines += markdown_table(block.frame, block.digits)
        elif isinstance(block, Image):
            lines += [f"![{block.caption}]({block.name})", "", f"*{block.caption}.*"]
        else:
            lines.append(block)
    return "\n".join(lines)


def markdown_table(table: pd.DataFrame, digits: int = 3) -> list[str]:
    """A GitHub-flavoured Markdown table (pandas' to_markdown needs the tabulate package)."""
    header = "| " + " | ".join(str(column) for column in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = [
        "| " + " | ".join(_markdown_cell(value, digits) for value in row) + " |"
        for row in table.itertuples(index=False)
    ]
    return [header, rule, *body]


def number(value: float | None, digits: int = 3) -> str:
    """`value` with `digits` decimals; empty for None and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value + 0.0:.{digits}f}"  # + 0.0 turns -0.0 into 0.0


def cell(value: object, digits: int) -> str:
    """A table cell as text: empty when missing, small and large numbers in g format."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:.{digits}g}"
        return number(value, digits)
    return str(value)


def _markdown_cell(value: object, digits: int) -> str:
    return cell(value, digits).replace("|", "\\|").replace("\n", " ")


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       line-height: 1.45; color: #1b1b1b; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; }
figcaption { font-style: italic; }
code { background: #f3f3f3; padding: 0 0.2rem; }
"""


def html_page(blocks: list[Block], title: str) -> str:
    """The report as one HTML page that needs no other file: tables inline, images as data URIs."""
    body: list[str] = []
    for group in _groups(blocks):
        if isinstance(group, Table):
            shown = group.frame.map(lambda value, digits=group.digits: cell(value, digits))
            body.append(shown.to_html(index=False, border=0))
        elif isinstance(group, Image):
            source = "data:image/png;base64," + base64.b64encode(group.png).decode("ascii")
            caption, name = html.escape(group.caption), html.escape(group.name)
            body.append(
                f'<figure><img src="{source}" alt="{caption}" data-file="{name}">'
                f"<figcaption>{caption}.</figcaption></figure>"
            )
        else:
            body.append(_html_paragraph(group))
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            '<head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{STYLE}</style></head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
            "",
        ]
    )


def _groups(blocks: list[Block]) -> list[Table | Image | list[str]]:
    """Tables and images as they are, each heading alone, and runs of other non-blank lines as
    one paragraph (or list) each."""
    groups: list[Table | Image | list[str]] = []
    lines: list[str] = []
    for block in [*blocks, ""]:
        if isinstance(block, str) and block.strip() and not block.startswith("#"):
            lines.append(block)
            continue
        if lines:
            groups.append(lines)
            lines = []
        if not isinstance(block, str):
            groups.append(block)
        elif block.startswith("#"):
            groups.append([block])  # a heading is a group of its own
    return groups


def _html_paragraph(lines: list[str]) -> str:
    """A heading, a bulleted list or a paragraph."""
    first = lines[0]
    if first.startswith("#"):
        level = len(first) - len(first.lstrip("#"))
        return f"<h{level}>{_inline(first[level:].strip())}</h{level}>"
    if all(line.startswith("- ") for line in lines):
        items = "".join(f"<li>{_inline(line[2:])}</li>" for line in lines)
        return f"<ul>{items}</ul>"
    return f"<p>{_inline(' '.join(lines))}</p>"


# Code spans first, so that an asterisk inside one stays an asterisk.
_INLINE = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*|\*(.+?)\*|\[([^\]]+)\]\(([^)\s]+)\)")


def _inline(text: str) -> str:
    """Markdown's inline marks as HTML, everything else escaped."""
    parts, start = [], 0
    for match in _INLINE.finditer(text):
        parts.append(html.escape(text[start : match.start()]))
        code, strong, emphasis, label, target = match.groups()
        if code is not None:
            parts.append(f"<code>{html.escape(code)}</code>")
        elif strong is not None:
            parts.append(f"<strong>{_inline(strong)}</strong>")
        elif emphasis is not None:
            parts.append(f"<em>{_inline(emphasis)}</em>")
        else:
            parts.append(f'<a href="{html.escape(target)}">{_inline(label)}</a>')
        start = match.end()
    parts.append(html.escape(text[start:]))
    return "".join(parts)

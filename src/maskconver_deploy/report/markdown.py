"""The report as a list of blocks (headings, paragraphs, tables, lists, images), and its Markdown rendering.

The same blocks are rendered to HTML by `report.html`, so both files always say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str
    kind: str = ""  # "" or "note" (a boxed remark in HTML, a quote in Markdown)


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    status_column: str | None = None  # a column whose values (met/missed/pass/fail...) get a colour in HTML


@dataclass
class Image:
    path: str  # relative to the report folder, e.g. "plots/pq_vs_latency.png"
    alt: str
    caption: str = ""


@dataclass
class ImageRow:
    images: list[Image] = field(default_factory=list)


Block = Heading | Para | Bullets | Table | Image | ImageRow


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    """Markdown text of the blocks (GitHub-flavoured tables, images by relative path)."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Para):
            out.append(f"> {block.text}" if block.kind == "note" else block.text)
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            lines = []
            if block.caption:
                lines.append(f"*{block.caption}*")
                lines.append("")
            lines.append("| " + " | ".join(_cell(c) for c in block.columns) + " |")
            lines.append("|" + "|".join("---" for _ in block.columns) + "|")
            for row in block.rows:
                lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
            out.append("\n".join(lines))
        elif isinstance(block, Image):
            text = f"![{block.alt}]({block.path})"
            if block.caption:
                text += f"\n\n*{block.caption}*"
            out.append(text)
        elif isinstance(block, ImageRow):
            out.append(" ".join(f"![{img.alt}]({img.path})" for img in block.images))
        else:  # pragma: no cover - the union above is closed
            raise TypeError(f"unknown block {type(block).__name__}")
    return "\n\n".join(out) + "\n"

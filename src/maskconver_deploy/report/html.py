"""The report's blocks as one self-contained HTML page: inline CSS, every image embedded as a base64 PNG."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from maskconver_deploy.report.markdown import Block, Bullets, Heading, Image, ImageRow, Para, Table

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1180px;
color:#1d1f23;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem;border-bottom:2px solid #333;padding-bottom:.3rem}
h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ccc;padding-bottom:.2rem}
h3{font-size:1.05rem;margin-top:1.4rem}
table{border-collapse:collapse;margin:.6rem 0 1.2rem;font-size:.82rem}
th,td{border:1px solid #d0d4da;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f0f2f5}
tr:nth-child(even) td{background:#fafbfc}
caption{caption-side:top;text-align:left;font-style:italic;color:#444;padding-bottom:.3rem}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5rem .8rem;margin:.8rem 0}
figure{margin:1rem 0}
figcaption{font-size:.85rem;color:#555}
img{max-width:100%;height:auto}
.row{display:flex;flex-wrap:wrap;gap:.8rem}
.row figure{flex:1 1 220px;margin:0}
.s-good{background:#e3f4e3 !important;color:#14591a;font-weight:600}
.s-bad{background:#fde4e1 !important;color:#8a1c12;font-weight:600}
.s-meh{background:#fff3d6 !important;color:#6b4d00}
"""

GOOD = ("met", "pass", "ok", "yes")
BAD = ("missed", "fail", "failed")


def _status_class(text: str) -> str:
    word = text.strip().lower().split(" ")[0] if text.strip() else ""
    if word in GOOD:
        return "s-good"
    if word in BAD:
        return "s-bad"
    if word:
        return "s-meh"
    return ""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure(image: Image, root: Path) -> str:
    src = _data_uri(root / image.path)
    caption = f"<figcaption>{html.escape(image.caption)}</figcaption>" if image.caption else ""
    return f'<figure><img src="{src}" alt="{html.escape(image.alt)}">{caption}</figure>'


def render_html(blocks: list[Block], root: Path, title: str) -> str:
    """HTML page of the blocks; images are read from `root` and inlined, nothing refers outside the file."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            level = min(max(block.level, 1), 6)
            parts.append(f"<h{level}>{html.escape(block.text)}</h{level}>")
        elif isinstance(block, Para):
            css = ' class="note"' if block.kind == "note" else ""
            parts.append(f"<p{css}>{html.escape(block.text)}</p>")
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{html.escape(item)}</li>" for item in block.items)
            parts.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            status_index = block.columns.index(block.status_column) if block.status_column in block.columns else -1
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block.columns)
            body = []
            for row in block.rows:
                cells = []
                for index, value in enumerate(row):
                    css = _status_class(value) if index == status_index else ""
                    attr = f' class="{css}"' if css else ""
                    cells.append(f"<td{attr}>{html.escape(str(value))}</td>")
                body.append("<tr>" + "".join(cells) + "</tr>")
            caption = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
            parts.append(f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
        elif isinstance(block, Image):
            parts.append(_figure(block, root))
        elif isinstance(block, ImageRow):
            parts.append('<div class="row">' + "".join(_figure(img, root) for img in block.images) + "</div>")
        else:  # pragma: no cover - the union is closed
            raise TypeError(f"unknown block {type(block).__name__}")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"

"""One self-contained HTML page: inline CSS, pictures as data URIs, no remote resource at all."""

from __future__ import annotations

import base64
import datetime as dt
import html
from collections.abc import Iterable

from fpc_ray import __version__

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1d2330; background: #f6f7f9; }
header { background: #1d2330; color: #fff; padding: 18px 32px; }
header h1 { margin: 0; font-size: 22px; } header p { margin: 4px 0 0; color: #c9cfdb; }
main { padding: 8px 32px 40px; max-width: 1200px; }
section { background: #fff; border-radius: 8px; padding: 14px 20px; margin: 18px 0;
          box-shadow: 0 1px 3px rgba(0,0,0,.08); }
h2 { font-size: 17px; margin: 4px 0 12px; } h3 { font-size: 14px; margin: 12px 0 6px; }
table { border-collapse: collapse; margin: 6px 0; }
td, th { padding: 4px 10px; border-bottom: 1px solid #e3e6eb; text-align: left; vertical-align: top; }
th { background: #f0f2f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.plot { max-width: 100%; margin: 6px 12px 6px 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 150px; font-size: 12px; } figure img { width: 150px; border-radius: 4px; background: #000; }
figcaption { word-break: break-all; } .muted { color: #6b7385; } code { font-size: 12px; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def img(png: bytes, alt: str, cls: str = "plot") -> str:
    """An <img> whose picture travels inside the page."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def table(headers: list[str], rows: Iterable[Iterable], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            text = f"{v:.4f}" if isinstance(v, float) else esc(v if v is not None else "—")
            cells.append(f'<td class="num">{text}</td>' if i in numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{esc(title)}</h2>{''.join(parts)}</section>"


def page(title: str, subtitle: str, sections: list[str]) -> str:
    made = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header><main>{''.join(sections)}"
        f"<p class=\"muted\">fpc-ray {esc(__version__)} report, made {made}</p></main></body></html>"
    )

"""HTML pieces of the report page: its style sheet, escaped text, tables, embedded images.

Everything that reaches the page from a run (names, prompts, completions, config values) goes through
:func:`escape` or :func:`text_block`; images are embedded as base64 data URIs so the page stands alone.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distalign.stats.metrics import Estimate

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #ccc; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; display: block; max-width: 100%; overflow-x: auto; }
.wide { overflow-x: auto; } th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
img { max-width: 100%; margin: 0.5em 0; border: 1px solid #eee; } .note { color: #a33; }
figure { margin: 0.5em 0; } .plots { display: flex; flex-wrap: wrap; gap: 0 1.5em; align-items: flex-start; }
.runname, .ci { white-space: nowrap; } .ci { color: #666; font-size: 0.88em; }
.muted { color: #777; font-size: 0.9em; } details { margin: 0.5em 0; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; border-radius: 2px; margin-right: 0.35em;
  vertical-align: -0.05em; }
.verdicts { display: grid; gap: 0.6em; margin: 1em 0; }
.verdict { border-left: 6px solid #999; background: #f7f7f7; padding: 0.55em 0.9em; }
.verdict.dominates { border-color: #2e8b57; background: #eef8f1; }
.verdict.mixed { border-color: #d4a017; background: #fdf7e6; }
.verdict.does_not_beat { border-color: #c0392b; background: #fbeeee; }
.verdict .run { font-weight: 600; } .verdict p { margin: 0.25em 0; }
.live { background: #e8f1fb; border: 1px solid #b5d0ee; padding: 0.4em 0.8em; }
.prompt { margin: 1.4em 0 0.4em; } .prompt .text { font-weight: 600; }
.gens { display: grid; gap: 0.6em; } .gen { border: 1px solid #ddd; padding: 0.45em 0.6em; min-width: 0; }
.gen h4 { margin: 0 0 0.3em; font-size: 0.95em; } .gen .reward { color: #555; font-size: 0.85em; }
.completion { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, monospace;
  font-size: 0.85em; margin: 0.2em 0 0.5em; }
"""

# C0 control characters other than tab and newline, and DEL: shown as their Unicode control pictures.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def escape(value: Any) -> str:
    """``value`` as HTML-escaped text (quotes included)."""
    return html.escape(str(value), quote=True)


def text_block(text: str) -> str:
    """Model text, escaped, with control characters drawn visibly (U+2400 block) instead of dropped."""
    visible = _CONTROL.sub(lambda m: chr(0x2421 if m.group() == "\x7f" else 0x2400 + ord(m.group())), text)
    return escape(visible)


class Raw(str):
    """HTML that :func:`table` puts into a cell as it is (built from escaped pieces by the caller)."""


def fmt(value: Any) -> str:
    """A table cell's text: an estimate as ``value [low, high]``, floats to 4 significant digits."""
    if isinstance(value, Estimate):
        return f"{value.value:.4g} [{value.low:.4g}, {value.high:.4g}]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table; every header and cell escaped (cells through :func:`fmt`), except :class:`Raw` cells."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def estimate_cell(value: Estimate | None, digits: int = 3, *, sign: bool = False) -> Raw | None:
    """A compact table cell: the estimate on one line (with its sign: ``sign``), its CI below it in
    small print."""
    if value is None:
        return None
    low, high = f"{value.low:.{digits}g}", f"{value.high:.{digits}g}"
    point = f"{value.value:+.{digits}g}" if sign else f"{value.value:.{digits}g}"
    return Raw(f'{point}<br><span class="ci">[{low}, {high}]</span>')


def _cell(value: Any) -> str:
    return f"<td>{value if isinstance(value, Raw) else escape(fmt(value))}</td>"


def image(path: Path, caption: str) -> str:
    """A figure embedding the PNG at ``path`` as a data URI, with ``caption`` as alt text and caption."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = escape(caption)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
        f'<figcaption class="muted">{alt}</figcaption></figure>'
    )


def swatch(color: str) -> str:
    """A small square in a run's plot colour, to tie the page's text to the plots."""
    return f'<span class="swatch" style="background:{escape(color)}"></span>'

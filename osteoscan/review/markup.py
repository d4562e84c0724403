"""HTML building blocks of the review pages: escaping, the page shell, its CSS and its policy.

Every string that came from a file, a header, the CSV or the state goes through :func:`esc`
(HTML-escaped, control characters made visible, long values cut), and every URL the pages use
is one osteoscan made itself (hashed file names), passed through :func:`url`. The pages carry a
Content-Security-Policy that allows no script at all, images only from the page's own folder or
``data:``, and only the page's own stylesheet (by hash): even a value that escaped escaping could
not run or fetch anything.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from urllib.parse import quote

MAX_CELL = 300  # characters of one value shown; the rest is counted, not shown
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def clean(value: object, limit: int = MAX_CELL) -> str:
    """A value as display text: control and bidi-override characters shown as ``\\xNN``
    escapes (a file name must not reorder or hide the text around it), cut at ``limit``."""
    text = "" if value is None else str(value)
    if text.isascii() and text.isprintable() and len(text) <= limit:
        return text  # the common case, checked at C speed
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates of odd names
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                        else f"\\u{ord(m.group()):04x}", text)  # fmt: skip
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text)} characters)"
    return text


def esc(value: object, limit: int = MAX_CELL) -> str:
    """:func:`clean` then HTML-escape (quotes too: safe in text and in attribute values)."""
    return html.escape(clean(value, limit), quote=True)


def url(relative: str) -> str:
    """A relative URL for a file osteoscan named: percent-encoded, never a scheme."""
    return html.escape(quote(relative.replace("\\", "/"), safe="/#-._~"), quote=True)


CSS = """
:root { --ink:#1d2430; --muted:#5b6472; --line:#d6dbe3; --flag:#c0392b; --bg:#f6f7f9;
  --warn-bg:#fff4e5; --warn:#8a4b00; font-family: system-ui, -apple-system, "Segoe UI",
  Roboto, "DejaVu Sans", sans-serif; color: var(--ink); }
body { margin: 0; background: var(--bg); font-size: 15px; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 1.6em; margin: 8px 0 4px; } h2 { font-size: 1.25em; margin: 28px 0 8px;
  border-bottom: 2px solid var(--line); padding-bottom: 4px; } h3 { font-size: 1.05em; }
a { color: #1f5fa8; }
.banner { background: var(--warn-bg); border: 2px solid #f0a04b; color: var(--warn);
  border-radius: 6px; padding: 10px 14px; margin: 10px 0; }
.banner strong { color: #6b3a00; }
.meaning { background: #fff; border: 1px solid var(--line); border-radius: 6px;
  padding: 8px 14px; margin: 10px 0; }
.meaning ul { margin: 4px 0; padding-left: 20px; }
nav.toc { margin: 8px 0; } nav.toc a { margin-right: 14px; }
.counts { display: flex; flex-wrap: wrap; gap: 8px; margin: 10px 0; }
.count { background: #fff; border: 1px solid var(--line); border-radius: 6px;
  padding: 6px 12px; min-width: 84px; }
.count b { display: block; font-size: 1.4em; }
.count span { color: var(--muted); font-size: .85em; }
.count.flag b { color: var(--flag); }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f5; font-weight: 600; }
table.kv th { width: 200px; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
.plots figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 6px;
  padding: 6px; } .plots img { width: 550px; max-width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: .85em; max-width: 550px; }
.flagged { list-style: none; padding: 0; margin: 0; }
.row { display: grid; grid-template-columns: 44px 340px 1fr; gap: 12px; background: #fff;
  border: 1px solid var(--line); border-left: 5px solid var(--flag); border-radius: 6px;
  padding: 10px; margin: 0 0 10px; break-inside: avoid; }
.rank { font-size: 1.3em; font-weight: 700; color: var(--flag); }
.thumbs { display: flex; gap: 8px; } .thumbs figure { margin: 0; width: 164px; }
.thumbs img { width: 164px; height: 164px; object-fit: contain; background: #111;
  display: block; border-radius: 3px; }
.thumbs figcaption { font-size: .75em; text-align: center; }
.ph { width: 164px; height: 164px; background: repeating-linear-gradient(45deg, #eceff3,
  #eceff3 8px, #f7f8fa 8px, #f7f8fa 16px); color: var(--muted); display: flex;
  align-items: center; justify-content: center; text-align: center; font-size: .8em;
  border-radius: 3px; border: 1px dashed #b9c0ca; padding: 6px; box-sizing: border-box; }
.thumbs .ph { width: 336px; }
.facts { min-width: 0; } .facts table { width: 100%; font-size: .9em; }
.facts th { width: 130px; } .mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace;
  font-size: .88em; overflow-wrap: anywhere; }
.score { font-size: 1.15em; font-weight: 700; color: var(--flag); }
meter { width: 120px; vertical-align: middle; }
.facts table.probs { width: auto; } .probs td { border: 0; padding: 1px 10px 1px 0; }
.muted { color: var(--muted); } .pager { margin: 12px 0; display: flex; flex-wrap: wrap; gap: 6px; }
.pager a, .pager span { border: 1px solid var(--line); border-radius: 4px; padding: 2px 8px;
  background: #fff; text-decoration: none; } .pager span.here { background: var(--ink);
  color: #fff; }
.problems td.n { text-align: right; font-variant-numeric: tabular-nums; }
.problems ul { margin: 0; padding-left: 18px; }
footer { margin-top: 32px; color: var(--muted); font-size: .85em; border-top: 1px solid
  var(--line); padding-top: 8px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 8px 20px; }
.card pre { white-space: pre-wrap; }
@media (max-width: 820px) { .row { grid-template-columns: 1fr; } }
@media print { body { background: #fff; font-size: 11pt; } nav.toc, .pager { display: none; }
  main { max-width: none; padding: 0; } .row { border-left-width: 3px; }
  .plots img { width: 48%; } a { color: inherit; text-decoration: none; } }
"""


def _css_hash(css: str) -> str:
    digest = hashlib.sha256(css.encode("utf-8")).digest()
    return "sha256-" + base64.b64encode(digest).decode("ascii")


# No script-src: with default-src 'none', nothing runs (inline, event handler, javascript: URL).
POLICY = (
    f"default-src 'none'; img-src 'self' data:; style-src '{_css_hash(CSS)}'; "
    "base-uri 'none'; form-action 'none'"
)


def page(title: str, body: str) -> str:
    """A whole HTML document: ``title`` (escaped here) around ``body`` (already markup)."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(POLICY)}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"{body}\n</main>\n</body>\n</html>\n"
    )

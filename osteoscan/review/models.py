"""The models named in the results: their installed package, its card and what its scores mean.

A row names its model as ``"<name> <version>"``. The package is looked up by *name* only among the
installed packages (never as a path: a results file must not point the page at arbitrary
folders); its ``card.md`` becomes an HTML page beside the report, and its "what the image adds"
lines (written by :mod:`osteoscan.card` from held-out metrics) say on the page what the scores
mean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from osteoscan.review.markup import esc, page, url

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass
class ModelInfo:
    """One model label of the results and what is known about it."""

    label: str
    rows: int
    installed: bool = False
    version_matches: bool = False
    card_file: str | None = None  # the card page, relative to the report's folder
    threshold: float | None = None
    image_only_threshold: float | None = None
    covariates: list[str] = field(default_factory=list)
    meaning: list[str] = field(default_factory=list)  # plain-text lines from the card


def _card_meaning(card: str) -> list[str]:
    """The card's "What the image adds" bullet lines, markdown emphasis removed."""
    lines = []
    for line in card.splitlines():
        if line.startswith("- **Image"):
            lines.append(line[2:].replace("**", ""))
    return lines


def render_card(text: str, title: str, back: str) -> str:
    """The card (markdown) as an HTML page (``back``: the report's file name, for a link back);
    raw HTML in the card is shown as text, never parsed."""
    try:
        from markdown_it import MarkdownIt

        md = MarkdownIt("commonmark", {"html": False}).enable("table")
        body = md.render(text)  # escapes text; html=False keeps tags as text; links validated
    except ImportError:  # markdown-it comes with rich; without it the card stays plain text
        body = f"<pre>{esc(text, limit=1_000_000)}</pre>"
    return page(title, f'<p><a href="../{url(back)}">← back to the report</a></p>\n'
                       f'<div class="card">{body}</div>')  # fmt: skip


def describe_models(labels: dict[str, int], folder: Path, rel: str, back: str) -> list[ModelInfo]:
    """:class:`ModelInfo` per label; card pages written into ``folder`` (``rel`` for links,
    ``back``: the report's file name, for the link back)."""
    from osteoscan.errors import OsteoscanError
    from osteoscan.manifest import read_manifest, resolve_package

    out = []
    for i, (label, n) in enumerate(labels.items()):
        info = ModelInfo(label or "(unnamed)", n)
        out.append(info)
        name, _, version = label.rpartition(" ")
        if not _NAME.fullmatch(name or ""):
            continue
        try:
            pkg = resolve_package(name)
            manifest = read_manifest(pkg)
        except (OsteoscanError, OSError, ValueError):
            continue
        info.installed, info.version_matches = True, manifest.version == version
        info.threshold = manifest.threshold
        info.image_only_threshold = manifest.image_only_threshold
        info.covariates = list(manifest.covariates)
        try:
            card = (pkg / "card.md").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        info.meaning = _card_meaning(card)
        target = folder / f"model-card-{i + 1}.html"
        folder.mkdir(parents=True, exist_ok=True)
        title = f"Model card: {manifest.name} {manifest.version}"
        target.write_text(render_card(card, title, back), encoding="utf-8")
        info.card_file = f"{rel}/{target.name}"
    return out

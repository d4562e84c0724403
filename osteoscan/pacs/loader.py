"""Where a retrieved instance lies while it is read, and the load stage that reads it there.

Retrieved instances are written to a private cache folder (next to the state, mode 0700) as
``<cache>/<study>/<series>/<instance>.dcm`` and deleted once their chunk is scored.
:class:`PacsLoader` is the ordinary :class:`~osteoscan.load.Loader` (same guards, gate, routing,
preprocessing) reading that file, with every record keyed ``dicomweb:<study>/<series>/<instance>``
as the state and the outputs know it (the cache path never reaches a row).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from osteoscan.load import LoadedFrame, Loader
from osteoscan.pacs.query import PREFIX, split_key


def cache_file(cache: str | Path, key: str) -> Path | None:
    """The cache file of a ``dicomweb:`` key (None for any other path)."""
    uids = split_key(key)
    return None if uids is None else Path(cache, uids[0], uids[1], uids[2] + ".dcm")


def key_of(cache: str | Path, path: str) -> str:
    """The ``dicomweb:`` key of a cache file (``path`` itself when it is not one)."""
    try:
        rel = Path(path).relative_to(cache)
    except ValueError:
        return path
    parts = rel.parts
    if len(parts) != 3 or not parts[2].endswith(".dcm"):
        return path
    return f"{PREFIX}{parts[0]}/{parts[1]}/{parts[2][:-4]}"


@dataclass
class PacsLoader(Loader):
    """A :class:`Loader` for the cache folder ``cache``: records keyed ``dicomweb:…``.

    The engine is handed the cache files themselves (so its in-flight logs and reader-death
    handling name real files); each record leaves with the instance's key as its path.
    """

    cache: str = ""

    def __call__(
        self, path: str | Path, kind: str | None = None, root: str | Path = ""
    ) -> list[LoadedFrame]:
        """The load stage on the cached file ``path``, records keyed by its instance."""
        key = key_of(self.cache, str(path))
        records = super().__call__(path, kind, root)
        for rec in records:
            rec.path, rec.root = key, PREFIX
        return records

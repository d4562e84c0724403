"""The DICOMweb front end of a scan: discover → pre-filter → fetch in chunks, then the usual stages.

:func:`osteoscan.scan.pipeline.run_scan` calls, in order:

1. :meth:`PacsSource.discover` — checks the server (exit 1 when unreachable or refused), runs the
   QIDO-RS searches (date window, modalities) and returns one :class:`~osteoscan.discover.Found`
   per instance, plus the instances a failed retrieval left to retry;
2. the ordinary plan stage (state signatures: an instance seen before is not planned again);
3. :meth:`PacsSource.prefilter` — the instances the search attributes already rule out become
   ``skipped`` rows, never retrieved;
4. :meth:`PacsSource.chunks` — WADO-RS retrieves the rest a chunk at a time into the private
   cache (5xx/timeout: retried, then an ``error`` row naming the HTTP status, retried next run);
   load, score and record run on each chunk, whose files are deleted before the next one;
5. :meth:`PacsSource.finish` — after a complete run, remembers its date: the next run's default
   window starts one day before it (StudyDate), so a nightly cron needs no dates.

A study whose StudyDate is older than that window (a prior imported from elsewhere) is found only
with an explicit ``--since``.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from osteoscan.discover import Found
from osteoscan.pacs.client import PacsClient, RequestFailed
from osteoscan.pacs.loader import PacsLoader, cache_file, key_of
from osteoscan.pacs.prefilter import skip_reason, skipped_rows
from osteoscan.pacs.query import (
    DEFAULT_MODALITIES,
    FIELDS,
    ROOT,
    date_range,
    instances,
    search_filters,
    split_key,
)
from osteoscan.pacs.url import ServerUrl
from osteoscan.rows import ResultRow, ScoredRow, utc_now
from osteoscan.scan.record import record_batch
from osteoscan.scan.routing import Router

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from osteoscan.manifest import Manifest
    from osteoscan.preprocess import PreprocessConfig
    from osteoscan.scan.config import ScanConfig
    from osteoscan.scan.state import ScanState

CHUNK = 128  # instances retrieved, scored and deleted at a time: bounds the cache's size
RETRY_META = "dicomweb:retry"  # {key: [size, signature]} of instances whose retrieval failed


def cache_dir_for(state_path: str | Path) -> Path:
    """The private cache folder of retrieved instances: ``<state>.dicomweb-cache``."""
    return Path(str(state_path) + ".dicomweb-cache")


def _today() -> _dt.date:
    return _dt.datetime.now(_dt.timezone.utc).date()


class PacsSource:
    """One scan of a DICOMweb server (see the module docstring)."""

    def __init__(self, cfg: ScanConfig, manifests: Sequence[Manifest], state_path: Path) -> None:
        self.cfg = cfg
        self.url = ServerUrl.parse(str(cfg.paths[0]))
        self.client = PacsClient(self.url, timeout=(10.0, cfg.dicomweb_timeout_s),
                                 attempts=cfg.dicomweb_attempts,
                                 backoff_s=cfg.dicomweb_backoff_s)  # fmt: skip
        names = [f"{m.name} {m.version}" for m in manifests]
        self.router = Router([list(m.body_parts) for m in manifests], names, cfg.body_part)
        self.cache = cache_dir_for(state_path)
        self.attrs: dict[str, Dataset] = {}
        self.started = _today()
        self.window: str | None = None
        self.n_skipped = self.n_failed = 0
        self._recorded: list[ScoredRow] = []

    @property
    def watermark_key(self) -> str:
        """Meta key of the date of the last complete run against this server."""
        return f"dicomweb:last_run:{self.url.base}"

    # -- discover ----------------------------------------------------------------------------
    def discover(self, state: ScanState) -> tuple[list[Found], int]:
        """(instances found, instances dropped as malformed); exit 1 if the server fails."""
        # a killed run's retrieved copies hold identifiers: gone before anything else (we hold
        # the lock), even on a night with nothing to retrieve
        shutil.rmtree(self.cache, ignore_errors=True)
        self.client.check()
        since = self.cfg.since
        last = state.meta(self.watermark_key)
        if since is None and last and not self.cfg.force:
            day = _dt.datetime.strptime(last, "%Y%m%d").date() - _dt.timedelta(days=1)
            since = day.strftime("%Y%m%d")  # late arrivals of the day before are still found
        self.window = date_range(since, self.cfg.until)
        modalities = [m.upper() for m in self.cfg.modalities] or list(DEFAULT_MODALITIES)
        if modalities == ["ANY"]:
            modalities = []
        results = []
        for filters in search_filters(self.window, modalities):
            try:
                results += self.client.search_instances(filters, FIELDS)
            except RequestFailed as exc:
                from osteoscan.pacs.client import PacsUnreachable

                raise PacsUnreachable(f"search failed at {self.url}: {exc.detail}") from None
        found, dropped = instances(results)
        self.attrs = {i.key: i.attrs for i in found}
        entries = [i.found() for i in found]
        have = {str(f.path) for f in entries}
        for key, sig in self._retries(state).items():
            if key not in have and split_key(key):
                entries.append(Found(Path(key), ROOT, "dicom", "", (int(sig[0]), int(sig[1]))))
        return entries, dropped

    def _retries(self, state: ScanState) -> dict[str, list[int]]:
        return dict(json.loads(state.meta(RETRY_META, "{}") or "{}"))

    # -- pre-filter --------------------------------------------------------------------------
    def prefilter(self, state: ScanState, todo: Sequence[Found], key: str) -> list[Found]:
        """Record ``skipped`` rows for what the search attributes rule out; the rest to fetch."""
        rows: list[ScoredRow] = []
        rest: list[Found] = []
        now = utc_now()
        for f in todo:
            ds = self.attrs.get(str(f.path))
            why = skip_reason(ds, self.router) if ds is not None else None
            if why is None or ds is None:
                rest.append(f)
            else:
                rows += skipped_rows(str(f.path), ds, why[0], why[1], now)
                self.n_skipped += 1
        if rows:
            record_batch(state, rows, key, keep_heatmaps=False, include_phi=False)
            self._recorded += rows
        return rest

    # -- fetch -------------------------------------------------------------------------------
    def chunks(self, state: ScanState, todo: Sequence[Found], key: str) -> Iterator[list[Found]]:
        """Retrieve ``todo`` a chunk at a time; yields the cache files of each chunk.

        Failed retrievals are recorded as ``error`` rows before their chunk is yielded; a
        chunk's files are deleted when the caller asks for the next one (or stops).
        """
        self._reset_cache()
        try:
            for start in range(0, len(todo), CHUNK):
                got = self._fetch(state, todo[start : start + CHUNK], key)
                yield got
                for f in got:
                    f.path.unlink(missing_ok=True)
        finally:
            shutil.rmtree(self.cache, ignore_errors=True)

    def _reset_cache(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)  # a killed run's leftovers (we hold the lock)
        self.cache.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _fetch(self, state: ScanState, todo: Sequence[Found], key: str) -> list[Found]:
        import pydicom

        got, failed = [], []
        for f in todo:
            uids = split_key(str(f.path))
            path = cache_file(self.cache, str(f.path))
            if uids is None or path is None:
                continue
            try:
                ds = self.client.retrieve(*uids)
            except RequestFailed as exc:
                failed.append((f, exc))
                continue
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            got.append(Found(path, self.cache, "dicom", "", f.signature))
        self._record_failures(state, failed, key)
        done = {self.key_of(str(f.path)) for f in got}
        retry = self._retries(state)
        if any(k in retry for k in done):
            state.set_meta(RETRY_META, json.dumps({k: v for k, v in retry.items()
                                                   if k not in done}))  # fmt: skip
        return got

    def _record_failures(
        self, state: ScanState, failed: Sequence[tuple[Found, RequestFailed]], key: str
    ) -> None:
        """``error`` rows naming the HTTP status; the instances are planned again next run,
        except those the server says are gone (404/410: retrying cannot help)."""
        if not failed:
            return
        gone = {str(f.path) for f, exc in failed if exc.status in (404, 410)}
        rows = []
        for f, exc in failed:
            then = "not on the server any more" if str(f.path) in gone else "retried next run"
            why = f"could not retrieve from {self.url}: {exc.detail}; {then}"
            rows.append(ScoredRow(ResultRow.error(str(f.path), why)))
        record_batch(state, rows, key, keep_heatmaps=False, include_phi=False)
        self._recorded += rows
        retry = self._retries(state)
        for f, _exc in failed:
            if str(f.path) in gone:
                retry.pop(str(f.path), None)
                continue
            retry[str(f.path)] = list(f.signature or (0, 0))
            # an error row whose file entry is gone is planned (retrieved) again next run
            state.connection.execute("DELETE FROM files WHERE path=?", (str(f.path),))
        state.set_meta(RETRY_META, json.dumps(retry))
        self.n_failed += len(failed)

    def take_recorded(self) -> list[ScoredRow]:
        """Rows this source recorded itself since the last call (pre-filter skips, failed
        retrievals), for the run's progress counts."""
        out, self._recorded = self._recorded, []
        return out

    def local(self, key: str) -> Path | None:
        """The retrieved copy of instance ``key`` while its chunk is being scored."""
        return cache_file(self.cache, key)

    def key_of(self, path: str) -> str:
        """The ``dicomweb:`` key of a cache file path (other paths unchanged)."""
        return key_of(self.cache, path)

    def loader(
        self, router: Router, preprocess: Sequence[PreprocessConfig], keep_display: bool
    ) -> PacsLoader:
        """The load stage reading this source's cache (see :class:`PacsLoader`)."""
        return PacsLoader(router, list(preprocess), keep_display=keep_display,
                          cache=str(self.cache))  # fmt: skip

    # -- finish ------------------------------------------------------------------------------
    def finish(self, state: ScanState) -> None:
        """Remember a complete run: the next default window starts from its date."""
        state.set_meta(self.watermark_key, self.started.strftime("%Y%m%d"))

    def describe(self) -> str:
        """One line for the log: server, window, modalities (never credentials)."""
        window = self.window or "all dates"
        mods = ",".join(self.cfg.modalities) or ",".join(DEFAULT_MODALITIES)
        return f"{self.url}: StudyDate {window}, modalities {mods}"

"""What one scan is asked to do (:class:`ScanConfig`), what it reports while running
(:class:`ScanEvent`) and what it did (:class:`ScanSummary`): the types the CLI and the orchestrator
(:mod:`osteoscan.scan.pipeline`) share."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from osteoscan.errors import UsageError
from osteoscan.guards import GuardLimits

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # syntax only; availability: select_device


@dataclass
class ScanConfig:
    """Everything one scan needs (the ``osteoscan scan`` options).

    ``models``: package names or folders (empty → the default package); ``workers=None`` picks
    from the machine (:func:`osteoscan.runtime.default_workers`); ``threshold`` overrides the
    packages' screening thresholds; ``heatmaps_for`` picks which scored rows get a PNG;
    ``state`` is the state file (default next to ``out``); ``include_phi`` adds identifier
    columns; ``redact_paths`` writes paths as pseudonyms; ``prune`` drops the rows of files that
    are gone (else they are marked ``missing``); ``limits`` are the per-file guards;
    outputs are re-exported at least every ``export_every_s`` seconds during a long run.

    A DICOMweb source (``paths == ["dicomweb+http://HOST:PORT/PATH"]``, :mod:`osteoscan.pacs`)
    takes ``since``/``until`` (StudyDate, inclusive; default: from the day before the last
    complete run), ``modalities`` (default CR, DX, DR, RG, OT; ``any`` for no filter) and the
    per-request ``dicomweb_timeout_s``, ``dicomweb_attempts`` and ``dicomweb_backoff_s``.
    ``dicom_out`` (a folder) and ``send`` (a ``dicomweb+http…`` URL) receive a DICOM SR per
    scored instance and a KOS per study with flagged images (``dicom_heatmaps``: also a
    secondary capture of each flagged image's heatmap).
    """

    paths: Sequence[str | Path]
    out: str | Path
    hdf5: str | Path | None = None
    heatmaps_dir: str | Path | None = None
    heatmaps_for: Literal["flagged", "all"] = "flagged"
    hdf5_heatmaps: bool = True
    models: Sequence[str | Path] = ()
    device: str = "auto"
    batch_size: int = 32
    workers: int | None = None
    body_part: str = "auto"
    covariates: str | Path | None = None
    covariate_columns: tuple[str, str, str] = ("path", "age", "sex")
    require_covariates: bool = False
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    threshold: float | None = None
    force: bool = False
    quiet: bool = False
    state: str | Path | None = None
    include_phi: bool = False
    redact_paths: bool = False
    prune: bool = False
    limits: GuardLimits = field(default_factory=GuardLimits)
    export_every_s: float = 300.0
    since: str | None = None
    until: str | None = None
    modalities: Sequence[str] = ()
    dicomweb_timeout_s: float = 120.0
    dicomweb_attempts: int = 4
    dicomweb_backoff_s: float = 2.0
    dicom_out: str | Path | None = None
    send: str | None = None
    dicom_heatmaps: bool = False
    # Where files are read: ``local`` (reader processes here) or ``ray`` (Ray Data tasks on a
    # local Ray or, with ``ray_address``, a cluster); ``ray_actors``: score in a pool of that many
    # Ray actors instead of on the driver. None of these change a row: not in the run key.
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    ray_actors: int | None = None

    @property
    def dicomweb(self) -> bool:
        """True when the source is a DICOMweb server rather than files and folders."""
        from osteoscan.pacs import is_dicomweb

        return any(is_dicomweb(p) for p in self.paths)

    def validate(self) -> None:
        """Raise :class:`UsageError` for option values that cannot work."""
        if not self.paths:
            raise UsageError("give at least one PATH to scan")
        # A missing archive (an unmounted share, a typo in a crontab) must fail loudly, not
        # "succeed" with zero rows night after night.
        if self.dicomweb:
            self._validate_dicomweb()
        missing = [str(p) for p in self.paths if not self.dicomweb and not os.path.lexists(p)]
        if missing:
            raise UsageError(f"no such file or folder: {', '.join(missing)}")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise UsageError("--workers must be 0 or more")
        if self.heatmaps_for not in ("flagged", "all"):
            raise UsageError("--heatmaps-for must be flagged or all")
        if not _DEVICE.fullmatch((self.device or "auto").strip().lower()):
            raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.body_part not in ("auto", "knee", "spine"):
            raise UsageError("--body-part must be auto, knee or spine")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise UsageError("--threshold must be between 0 and 1")
        if self.redact_paths and self.include_phi:
            raise UsageError("--redact-paths and --include-phi contradict each other")
        self._validate_engine()
        self.validate_outputs()

    def _validate_engine(self) -> None:
        if self.engine not in ("local", "ray"):
            raise UsageError("--engine must be local or ray")
        if (self.ray_address or self.ray_actors) and self.engine != "ray":
            raise UsageError("--ray-address and --ray-model-actors need --engine ray")
        if self.ray_actors is not None and self.ray_actors < 1:
            raise UsageError("--ray-model-actors must be at least 1")
        if self.ray_address and self.dicomweb:  # retrieved instances sit in this machine's cache
            raise UsageError(
                "a DICOMweb source is scanned on this machine: leave out --ray-address"
            )

    def _validate_dicomweb(self) -> None:
        from osteoscan.pacs.query import date_range
        from osteoscan.pacs.url import ServerUrl

        if len(self.paths) != 1:
            raise UsageError("scan one DICOMweb server at a time, without files or folders")
        ServerUrl.parse(str(self.paths[0]))
        date_range(self.since, self.until)
        if self.include_phi:
            raise UsageError("--include-phi is not available for a DICOMweb source")
        if self.dicomweb_attempts < 1 or self.dicomweb_timeout_s <= 0:
            raise UsageError("DICOMweb attempts and timeout must be positive")

    def validate_outputs(self) -> None:
        """Raise :class:`UsageError` for DICOM result options that cannot work."""
        from osteoscan.pacs.url import ServerUrl

        if self.send:
            ServerUrl.parse(self.send)
        if (self.since or self.until or self.modalities) and not self.dicomweb:
            raise UsageError("--since, --until and --modality apply to a DICOMweb source only")
        if self.dicom_heatmaps and not (self.dicom_out or self.send):
            raise UsageError("--dicom-heatmaps needs --dicom-out or --send")


@dataclass
class ScanEvent:
    """Progress report. ``kind``: ``start`` (after discovery), ``batch`` or ``done``."""

    kind: str
    files_done: int
    files_total: int
    counts: dict[str, int]
    rows: int
    elapsed_s: float
    images_per_s: float
    eta_s: float | None
    message: str = ""


@dataclass
class ScanSummary:
    """What a finished scan did and where it wrote.

    ``counts`` are this run's new rows (``ok``/``skipped``/``error``/``flagged``) plus
    ``unchanged`` files; ``totals`` count what the results hold after the run (all rows).
    ``covariates`` and ``warnings`` speak of the images scored in this run.
    """

    n_files: int
    n_ignored: int
    rows: int
    counts: dict[str, int]
    elapsed_s: float
    images_per_s: float
    out: Path
    flagged_out: Path
    hdf5: Path | None
    heatmaps_dir: Path | None
    models: list[str]
    device: str
    workers: int
    batch_size: int
    # outputs rewritten by this run ([] when all were already current)
    written: list[Path] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    # where the scored images' age/sex came from (one line), and problems a person should fix
    covariates: str = ""
    warnings: list[str] = field(default_factory=list)
    # --dicom-out/--send: what was made, stored and is still waiting (one line; "" without)
    dicom_results: str = ""

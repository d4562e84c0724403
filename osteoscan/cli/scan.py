"""``osteoscan scan``: parse options, run :func:`osteoscan.scan.pipeline.run_scan`, render."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from osteoscan.errors import UsageError


def _columns(text: str) -> tuple[str, str, str]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(parts):
        raise UsageError("--covariate-columns takes three names: PATH_COL,AGE_COL,SEX_COL")
    return parts[0], parts[1], parts[2]


def register(app: typer.Typer) -> None:
    """Add the `scan` command to the app."""

    @app.command("scan")
    def scan(
        paths: Annotated[
            list[str],
            typer.Argument(
                metavar="PATH...",
                help="Files or folders to scan, or one DICOMweb server: "
                "dicomweb+http(s)://HOST:PORT/PATH (credentials from ~/.netrc or "
                "OSTEOSCAN_DICOMWEB_TOKEN, never the command line).",
            ),
        ],
        out: Annotated[
            Path, typer.Option("--out", "-o", metavar="CSV", help="Results CSV to write.")
        ],
        hdf5: Annotated[
            Path | None,
            typer.Option(metavar="FILE", help="Also write probabilities and heatmaps to HDF5."),
        ] = None,
        heatmaps: Annotated[
            Path | None,
            typer.Option("--heatmaps", metavar="DIR", help="Folder for Grad-CAM overlay PNGs."),
        ] = None,
        heatmaps_for: Annotated[
            str, typer.Option(metavar="flagged|all", help="Which scored images get a PNG.")
        ] = "flagged",
        model: Annotated[
            list[str] | None,
            typer.Option(
                "--model",
                "-m",
                metavar="NAME|DIR",
                help="Model package name or folder (repeatable).",
            ),
        ] = None,
        device: Annotated[
            str, typer.Option(metavar="auto|cpu|cuda[:N]", help="Where the model runs.")
        ] = "auto",
        batch_size: Annotated[int, typer.Option(metavar="N", help="Images per model batch.")] = 32,
        workers: Annotated[
            int | None,
            typer.Option(metavar="N", help="Reader processes (default: from the machine)."),
        ] = None,
        body_part: Annotated[
            str,
            typer.Option(
                metavar="auto|knee|spine",
                help="Body part of files that state none (PNG, JPEG); "
                "auto = the one part the loaded models serve.",
            ),
        ] = "auto",
        covariates: Annotated[
            Path | None,
            typer.Option(metavar="CSV", help="CSV of age/sex per image (path,age,sex)."),
        ] = None,
        covariate_columns: Annotated[
            str, typer.Option(metavar="PATH,AGE,SEX", help="Column names in --covariates.")
        ] = "path,age,sex",
        require_covariates: Annotated[
            bool,
            typer.Option(
                "--require-covariates",
                metavar="",
                help="An image without age and sex (header or CSV) is an error row, not scored.",
            ),
        ] = False,
        include: Annotated[
            list[str] | None,
            typer.Option(metavar="GLOB", help="Only files matching this glob (repeatable)."),
        ] = None,
        exclude: Annotated[
            list[str] | None,
            typer.Option(metavar="GLOB", help="Skip files matching this glob (repeatable)."),
        ] = None,
        threshold: Annotated[
            float | None,
            typer.Option(metavar="P", help="Override the model's screening threshold (0-1)."),
        ] = None,
        force: Annotated[
            bool, typer.Option(metavar="", help="Rescan images already scanned.")
        ] = False,
        state: Annotated[
            Path | None,
            typer.Option(
                metavar="FILE", help="Incremental state file (default: <out stem>.state.sqlite)."
            ),
        ] = None,
        include_phi: Annotated[
            bool,
            typer.Option(
                "--include-phi",
                metavar="",
                help="Add patient_id and accession_number columns (PHI!).",
            ),
        ] = False,
        prune: Annotated[
            bool,
            typer.Option(
                "--prune",
                metavar="",
                help="Drop the rows of files that are gone (default: keep them as missing).",
            ),
        ] = False,
        redact_paths: Annotated[
            bool,
            typer.Option(
                "--redact-paths",
                metavar="",
                help="Write each file path as a stable pseudonym in every output (folder and "
                "file names often hold patient names); the mapping stays in the state file.",
            ),
        ] = False,
        since: Annotated[
            str | None,
            typer.Option(
                metavar="YYYY-MM-DD",
                help="DICOMweb: studies from this StudyDate on (default: from the day before "
                "the last complete run).",
            ),
        ] = None,
        until: Annotated[
            str | None,
            typer.Option(metavar="YYYY-MM-DD", help="DICOMweb: studies up to this StudyDate."),
        ] = None,
        modality: Annotated[
            list[str] | None,
            typer.Option(
                "--modality",
                metavar="MOD",
                help="DICOMweb: modalities to search (repeatable or comma-separated; default "
                "CR,DX,DR,RG,OT; 'any' for all).",
            ),
        ] = None,
        dicom_out: Annotated[
            Path | None,
            typer.Option(
                metavar="DIR",
                help="Write a DICOM SR per scored image and a KOS per study with flagged "
                "images (they carry the patient's identifiers, as DICOM must).",
            ),
        ] = None,
        send: Annotated[
            str | None,
            typer.Option(
                metavar="URL",
                help="Store those DICOM results in the source studies on this DICOMweb "
                "server (dicomweb+http(s)://…, STOW-RS); failed stores are retried next run.",
            ),
        ] = None,
        dicom_heatmaps: Annotated[
            bool,
            typer.Option(
                "--dicom-heatmaps",
                metavar="",
                help="With --dicom-out/--send: also a secondary capture of each flagged "
                "image's heatmap ('NOT FOR DIAGNOSTIC USE' burned in).",
            ),
        ] = False,
        quiet: Annotated[
            bool,
            typer.Option("--quiet", "-q", metavar="", help="Plain timestamped log lines only."),
        ] = False,
        engine: Annotated[
            str,
            typer.Option(
                metavar="local|ray",
                help="Where files are read: reader processes on this machine, or Ray Data tasks "
                'on a Ray cluster (pip install -e ".[distributed]").',
            ),
        ] = "local",
        ray_address: Annotated[
            str | None,
            typer.Option(
                metavar="ADDR",
                help="With --engine ray: join this Ray cluster (default: start a local Ray sized "
                "to this machine, stopped at the end).",
            ),
        ] = None,
        ray_model_actors: Annotated[
            int | None,
            typer.Option(
                metavar="N",
                help="With --engine ray: score in a pool of N Ray actors (one GPU each where the "
                "cluster has GPUs) instead of on this machine.",
            ),
        ] = None,
        report: Annotated[
            Path | None,
            typer.Option(
                "--report",
                metavar="HTML",
                help="Also write the review page (HTML, with <stem>_files/ beside it) at the end.",
            ),
        ] = None,
    ) -> None:
        """Screen radiographs: one CSV row per image frame, flagged cases, heatmaps."""
        from osteoscan.cli.progress import make_reporter
        from osteoscan.scan.config import ScanConfig
        from osteoscan.scan.pipeline import run_scan

        if report is not None and heatmaps is None:
            from osteoscan.review import default_heatmaps_dir

            heatmaps = default_heatmaps_dir(report)  # the page's thumbnails come from the PNGs
        cfg = ScanConfig(
            paths=list(paths), out=out, hdf5=hdf5, heatmaps_dir=heatmaps,
            heatmaps_for=heatmaps_for,  # type: ignore[arg-type]
            models=list(model or []), device=device, batch_size=batch_size, workers=workers,
            body_part=body_part, covariates=covariates,
            covariate_columns=_columns(covariate_columns),
            require_covariates=require_covariates, include=list(include or []),
            exclude=list(exclude or []), threshold=threshold, force=force, quiet=quiet,
            state=state, include_phi=include_phi, redact_paths=redact_paths,
            prune=prune, since=since, until=until,
            modalities=[m.strip() for v in modality or [] for m in v.split(",") if m.strip()],
            dicom_out=dicom_out, send=send, dicom_heatmaps=dicom_heatmaps,
            engine=engine,  # type: ignore[arg-type]
            ray_address=ray_address, ray_actors=ray_model_actors,
        )  # fmt: skip
        reporter = make_reporter(quiet)
        try:
            summary = run_scan(cfg, on_event=reporter)
        finally:
            reporter.close()
        reporter.summary(summary)
        if report is not None:
            from osteoscan.review import report_after_scan

            page = report_after_scan(cfg, summary, report)
            typer.echo(f"review page: {page.html} ({page.flagged} flagged, {page.pages} page(s))")

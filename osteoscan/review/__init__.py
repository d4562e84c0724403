"""The morning-after review page: flagged images with heatmaps, plots, problems, per-night trend.

``write_report(results_csv, "report.html")`` writes a self-contained HTML page (no script, no
network) and its asset folder ``report_files/``; :func:`report_after_scan` is what
``osteoscan scan --report`` calls. Modules: :mod:`.data` (gathering from the CSV and the state),
:mod:`.thumbs`, :mod:`.plots`, :mod:`.models` (cards), :mod:`.markup` (escaping, page shell,
policy), :mod:`.sections`, :mod:`.build`.
"""

from osteoscan.review.build import (
    ReportResult,
    assets_folder,
    default_heatmaps_dir,
    report_after_scan,
    write_report,
)

__all__ = [
    "ReportResult",
    "assets_folder",
    "default_heatmaps_dir",
    "report_after_scan",
    "write_report",
]

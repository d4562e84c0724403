#!/usr/bin/env bash
# Nightly osteoscan screening wrapper, meant to be run from cron.
#
#   OSTEOSCAN_ARCHIVE   folder tree to screen (default: /data/xray-archive)
#   OSTEOSCAN_OUTDIR    where results, state and heatmaps live (default: /var/lib/osteoscan)
#   OSTEOSCAN_VENV      virtual environment holding osteoscan (default: /opt/osteoscan/.venv)
#   OSTEOSCAN_LOG       log file (default: $OSTEOSCAN_OUTDIR/nightly.log)
#
# Exit codes are osteoscan's own: 0 done (bad files are rows with status=error, not failures),
# 1 the run failed (no model, unwritable output, another scan still running), 2 usage error.
# Only new or changed images are scored: the state database next to results.csv remembers the rest,
# and a run killed half-way (reboot, OOM) is completed by the next one without duplicate rows.
# After a good night the review page is written: $OSTEOSCAN_OUTDIR/report.html (with report_files/
# beside it) shows the flagged images with their heatmaps, the plots, the errors and the per-night
# trend. It holds paths and thumbnails: give it the same protection as the images. A page that cannot
# be written makes the wrapper exit with osteoscan report's code (the scan's results are kept).
set -uo pipefail

archive="${OSTEOSCAN_ARCHIVE:-/data/xray-archive}"
outdir="${OSTEOSCAN_OUTDIR:-/var/lib/osteoscan}"
venv="${OSTEOSCAN_VENV:-/opt/osteoscan/.venv}"
log="${OSTEOSCAN_LOG:-$outdir/nightly.log}"

mkdir -p "$outdir/heatmaps" || { echo "cannot create $outdir" >&2; exit 1; }

(
  echo "$(date -u +%FT%TZ) nightly scan starting: $archive"
  "$venv/bin/osteoscan" scan "$archive" \
    --out "$outdir/results.csv" \
    --hdf5 "$outdir/results.h5" \
    --heatmaps "$outdir/heatmaps" \
    --quiet
  rc=$?
  if [ "$rc" -eq 0 ]; then
    "$venv/bin/osteoscan" report "$outdir/results.csv" \
      --html "$outdir/report.html" \
      --heatmaps "$outdir/heatmaps"
    rc=$?
    [ "$rc" -eq 0 ] || { echo "$(date -u +%FT%TZ) review page FAILED (exit $rc)"; exit "$rc"; }
  fi
  case "$rc" in
    0) echo "$(date -u +%FT%TZ) nightly scan done; flagged cases: $outdir/results.flagged.csv," \
         "review page: $outdir/report.html" ;;
    1) echo "$(date -u +%FT%TZ) nightly scan FAILED (exit 1): see the message above" ;;
    2) echo "$(date -u +%FT%TZ) nightly scan misconfigured (exit 2): check the options" ;;
    *) echo "$(date -u +%FT%TZ) nightly scan ended abnormally (exit $rc: killed or crashed)" ;;
  esac
  exit "$rc"
) >>"$log" 2>&1
rc=$?
# cron mails whatever a job prints: stay silent on success, speak up on failure.
[ "$rc" -eq 0 ] || echo "osteoscan nightly scan failed with exit $rc; see $log" >&2
exit "$rc"

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
  case "$rc" in
    0) echo "$(date -u +%FT%TZ) nightly scan done; flagged cases: $outdir/results.flagged.csv" ;;
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

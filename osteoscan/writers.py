"""Scan outputs: results CSV, ``<stem>.flagged.csv``, HDF5 and heatmap PNGs — all atomic.

Writers consume :class:`~osteoscan.rows.ResultRow` records (and NumPy arrays for the HDF5) read
back from the scan state, old and new rows alike. Every file is written to a temporary file in
the target folder and only replaces the target after ``fsync`` (:meth:`commit`); a run that
fails or is killed leaves the previous outputs untouched and no partial file under the target name.

CSV values: probabilities, score, threshold and uncertainty with 6 decimals, ``flagged`` as
``true``/``false``, missing values empty. Heatmap PNG names derive from a hash of the image_id,
never from patient data or the original file name.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from osteoscan import __version__
from osteoscan.atomic import AtomicFile, output_error, write_bytes
from osteoscan.errors import OutputError
from osteoscan.geometry import InputGeometry
from osteoscan.rows import ResultRow, utc_now

HEATMAP_METHOD = (
    "Grad-CAM on each member's cam_layer, target = summed positive-class logits / temperature; "
    "ReLU, bilinear upsampling to the model input, mean over members"
)
HEATMAP_NORMALISATION = "fused map divided by its per-image maximum (range [0, 1]); 0 when flat"


def flagged_path_for(out: str | Path) -> Path:
    """``results.csv`` → ``results.flagged.csv`` next to it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.flagged.csv")


def write_csv_atomic(target: str | Path, columns: Sequence[str], rows: Iterable[ResultRow]) -> Path:
    """Write a whole results CSV atomically (temp + fsync + ``os.replace``)."""
    with AtomicFile(target) as f:
        w = csv.writer(f.open("w", newline="", encoding="utf-8"))
        w.writerow(columns)
        for row in rows:
            w.writerow(row.csv_cells(columns))
    return f.target


class CsvResultsWriter:
    """Stream rows to a temporary results CSV (header first); :meth:`commit` publishes it.

    Rows are written as they come, so memory stays flat over large scans.
    """

    def __init__(self, path: str | Path, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self.path = Path(path)
        self._file = AtomicFile(self.path)
        self._fh = self._file.open("w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._fh)
        self._csv.writerow(self.columns)
        self.n_rows = 0

    def write_rows(self, rows: Iterable[ResultRow]) -> None:
        """Append rows (columns a row lacks are empty)."""
        try:
            for row in rows:
                self._csv.writerow(row.csv_cells(self.columns))
                self.n_rows += 1
        except OSError as exc:
            self.abort()
            raise output_error(self.path, exc) from exc

    def commit(self) -> Path:
        """Publish the file."""
        return self._file.commit()

    def abort(self) -> None:
        """Drop the temporary file; the previous output stays as it was."""
        self._file.abort()


def heatmap_name(image_id: str) -> str:
    """PNG file name for an image: a hash of its image_id (no patient data, no file name)."""
    return hashlib.sha256(image_id.encode("utf-8")).hexdigest()[:24] + ".png"


def write_heatmap_png(folder: str | Path, image_id: str, overlay_rgb: np.ndarray) -> Path:
    """Write an RGB uint8 overlay as ``<folder>/<hash>.png`` atomically; returns the path."""
    import cv2  # lazily: a no-op rescan writes nothing and should not pay for OpenCV

    target = Path(folder) / heatmap_name(image_id)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(overlay_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OutputError(f"could not encode heatmap PNG for {target.name}")
    return write_bytes(target, buf.tobytes())


class Hdf5ResultsWriter:
    """HDF5 of scored rows: a new file published atomically on commit, or (:meth:`reopen`) a
    published file appended to in place.

    Datasets (row-aligned, N = scored rows): ``path``, ``image_id``, ``model`` (UTF-8 strings),
    ``frame`` (int32), ``probs`` (N×C float32, NaN for classes a row's model lacks),
    ``member_probs`` (N×M×C float32, NaN-padded when models have fewer members), ``score``,
    ``uncertainty``, ``tscore`` (float32; NaN unless the row's model predicts T-scores),
    ``flagged`` (bool), ``has_heatmap`` (bool) and ``heatmaps``
    (N×h×w float16 in [0, 1], one chunk per image, gzip; zeros where ``has_heatmap`` is false),
    the heatmaps' transform back to the radiograph: ``source_shape`` (N×2: H, W of the image
    read), ``crop_box`` (N×4: top, left, bottom, right of the model's region in it) and
    ``input_box`` (N×4: top, left, height, width of that region inside the model input; the rest
    is padding), -1 where unknown.
    Root attributes: ``classes``, ``manifest`` (JSON of the first model), ``manifests`` (JSON
    object of all, by model label), ``heatmap_method``, ``heatmap_normalisation``,
    ``osteoscan_version``, ``created_at``.
    """

    def __init__(
        self,
        path: str | Path,
        classes: Sequence[str],
        n_members: int,
        heatmap_size: tuple[int, int],
        manifests: Mapping[str, Mapping[str, Any]],
    ) -> None:
        import h5py

        self.path = Path(path)
        self.classes = list(classes)
        self.n_members = int(n_members)
        self.hw = (int(heatmap_size[0]), int(heatmap_size[1]))
        self._file: AtomicFile | None = AtomicFile(self.path)
        try:
            self._h5 = h5py.File(self._file.tmp, "w")
            self._create(manifests)
        except OSError as exc:
            self._file.abort()
            raise output_error(self.path, exc) from exc
        self.n_rows = 0

    @classmethod
    def reopen(cls, path: str | Path, n_rows: int) -> Hdf5ResultsWriter:
        """Open a published file to append after its ``n_rows`` rows.

        Raises ``ValueError`` when the file does not hold exactly ``n_rows`` rows in every
        dataset, ``OSError`` when it cannot be opened: the caller then rewrites it whole.
        """
        import h5py

        h5 = h5py.File(path, "r+")
        try:
            if any(ds.shape[0] != n_rows for ds in h5.values()):
                raise ValueError(f"{path} does not hold the {n_rows} rows recorded")
            if "tscore" not in h5:  # written before the column existed: rewrite it whole
                raise ValueError(f"{path} has no tscore dataset")
            self = cls.__new__(cls)
            self.path, self._file, self._h5, self.n_rows = Path(path), None, h5, n_rows
            self.classes = list(json.loads(h5.attrs["classes"]))
            self.n_members = int(h5["member_probs"].shape[1])
            self.hw = (int(h5["heatmaps"].shape[1]), int(h5["heatmaps"].shape[2]))
        except BaseException:
            h5.close()
            raise
        return self

    def _create(self, manifests: Mapping[str, Mapping[str, Any]]) -> None:
        import h5py

        h5, c, m = self._h5, len(self.classes), self.n_members
        text = h5py.string_dtype("utf-8")
        for name in ("path", "image_id", "model"):
            h5.create_dataset(name, (0,), maxshape=(None,), dtype=text, chunks=(1024,))
        h5.create_dataset("frame", (0,), maxshape=(None,), dtype="i4", chunks=(1024,))
        for name in ("score", "uncertainty", "tscore"):
            h5.create_dataset(name, (0,), maxshape=(None,), dtype="f4", chunks=(1024,))
        for name in ("flagged", "has_heatmap"):
            h5.create_dataset(name, (0,), maxshape=(None,), dtype="?", chunks=(1024,))
        # where each heatmap lies in its radiograph (osteoscan.geometry.InputGeometry); -1: unknown
        for name, width in (("source_shape", 2), ("crop_box", 4), ("input_box", 4)):
            h5.create_dataset(name, (0, width), maxshape=(None, width), dtype="i4",
                              chunks=(1024, width))  # fmt: skip
        h5.create_dataset("probs", (0, c), maxshape=(None, c), dtype="f4", chunks=(256, c))
        h5.create_dataset(
            "member_probs", (0, m, c), maxshape=(None, m, c), dtype="f4", chunks=(256, m, c)
        )
        h5.create_dataset(
            "heatmaps", (0, *self.hw), maxshape=(None, *self.hw), dtype="f2",
            chunks=(1, *self.hw), compression="gzip", compression_opts=4, shuffle=True,
        )  # fmt: skip
        labels = list(manifests)
        h5.attrs["classes"] = json.dumps(self.classes)
        h5.attrs["manifest"] = json.dumps(manifests[labels[0]] if labels else {})
        h5.attrs["manifests"] = json.dumps(dict(manifests))
        h5.attrs["heatmap_method"] = HEATMAP_METHOD
        h5.attrs["heatmap_normalisation"] = HEATMAP_NORMALISATION
        h5.attrs["osteoscan_version"] = __version__
        h5.attrs["created_at"] = utc_now()

    def write(
        self,
        rows: Sequence[ResultRow],
        probs: np.ndarray,
        member_probs: np.ndarray,
        heatmaps: Sequence[np.ndarray | None],
        geometries: Sequence[InputGeometry | None] | None = None,
    ) -> None:
        """Append scored rows. ``probs`` (N×C) and ``member_probs`` (N×M×C) use this writer's
        class order already (see :meth:`align`); heatmaps are resized to the file's h×w."""
        n = len(rows)
        if n == 0:
            return
        start, stop = self.n_rows, self.n_rows + n
        h5 = self._h5
        try:
            for name in h5:
                h5[name].resize(stop, axis=0)
            h5["path"][start:stop] = [_utf8(r.path) for r in rows]
            h5["image_id"][start:stop] = [r.image_id for r in rows]
            h5["model"][start:stop] = [r.model for r in rows]
            h5["frame"][start:stop] = [r.frame for r in rows]
            h5["score"][start:stop] = [float(r.score or 0.0) for r in rows]
            h5["uncertainty"][start:stop] = [float(r.uncertainty or 0.0) for r in rows]
            # NaN for rows of models that predict no T-score
            h5["tscore"][start:stop] = [np.nan if r.tscore is None else r.tscore for r in rows]
            h5["flagged"][start:stop] = [r.is_flagged for r in rows]
            h5["probs"][start:stop] = probs.astype(np.float32)
            h5["member_probs"][start:stop] = member_probs.astype(np.float32)
            h5["has_heatmap"][start:stop] = [hm is not None for hm in heatmaps]
            geos = list(geometries) if geometries is not None else [None] * n
            h5["source_shape"][start:stop] = [g.source if g else (-1, -1) for g in geos]
            h5["crop_box"][start:stop] = [g.crop if g else (-1,) * 4 for g in geos]
            h5["input_box"][start:stop] = [g.placed if g else (-1,) * 4 for g in geos]
            ds = h5["heatmaps"]
            for i, hm in enumerate(heatmaps):
                if hm is None:
                    continue  # unwritten chunks read back as zeros (fill value) and cost nothing
                if hm.shape != self.hw:
                    import cv2

                    hm = cv2.resize(hm, (self.hw[1], self.hw[0]), interpolation=cv2.INTER_LINEAR)
                ds[start + i] = np.clip(hm, 0.0, 1.0).astype(np.float16)
        except OSError as exc:
            self.abort()
            raise output_error(self.path, exc) from exc
        self.n_rows = stop

    def align(
        self, classes: Sequence[str], probs: np.ndarray, member_probs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Map one model's (N×C'), (N×M'×C') arrays onto this file's classes and member count."""
        n = probs.shape[0]
        out_p = np.full((n, len(self.classes)), np.nan, np.float32)
        out_m = np.full((n, self.n_members, len(self.classes)), np.nan, np.float32)
        for j, c in enumerate(classes):
            k = self.classes.index(c)
            out_p[:, k] = probs[:, j]
            out_m[:, : member_probs.shape[1], k] = member_probs[:, :, j]
        return out_p, out_m

    def commit(self) -> Path:
        """Close and publish the file (a reopened file: close and fsync it in place)."""
        try:
            self._h5.close()
            if self._file is None:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                return self.path
        except OSError as exc:
            self.abort()
            raise output_error(self.path, exc) from exc
        return self._file.commit()

    def abort(self) -> None:
        """Drop the temporary file (a reopened file is closed; its caller rewrites it)."""
        # Closing a broken file must not mask the error that made us abort.
        with contextlib.suppress(Exception):
            self._h5.close()
        if self._file is not None:
            self._file.abort()


def _utf8(text: str) -> str:
    """HDF5 strings are UTF-8: bytes of a non-UTF-8 file name are kept as ``\\xNN`` escapes."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def read_hdf5(path: str | Path) -> dict[str, Any]:
    """Load a results HDF5 into a dict of NumPy arrays / lists plus ``attrs`` (tests, analysis)."""
    import h5py

    out: dict[str, Any] = {}
    with h5py.File(path, "r") as h5:
        for name, ds in h5.items():
            data = ds[()]
            if ds.dtype.kind == "O":
                data = [v.decode() if isinstance(v, bytes) else str(v) for v in data]
            out[name] = data
        out["attrs"] = {k: h5.attrs[k] for k in h5.attrs}
    return out

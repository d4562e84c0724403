"""The score stage: collated model inputs → result rows with probabilities (and heatmaps).

:func:`load_models` loads each package onto the device; :class:`Scorer` turns one
:class:`~osteoscan.scan.batch.FrameBatch` into :class:`~osteoscan.rows.ScoredRow` records, one
per frame in batch order: every row of the batch, scored or not, with ``file_frames`` set so the
state can tell when a file is complete. Pure compute: no file is read or written here.

Heatmaps. The HDF5 holds one heatmap per scored row, so with ``--hdf5`` (and ``hdf5_heatmaps``)
or ``--heatmaps-for all`` every row is explained in the *same* forward pass as its prediction.
With only ``--heatmaps DIR --heatmaps-for flagged``, the ensemble opens the Grad-CAM forward for
the whole batch (autograd starts at the CAM layer, so this costs about one inference) and
backpropagates only the rows its fused score flags. Scores never depend on the heatmap options.

T-score models (``manifest.target["kind"] == "tscore"``): :func:`predicted_tscores` recovers each
row's predicted T-score from its members' probabilities (:mod:`osteoscan.train.tscore`) for the
``tscore`` column; other models leave it empty.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from osteoscan.errors import OsteoscanError
from osteoscan.rows import ResultRow, ScoredRow, utc_now
from osteoscan.scan.config import ScanConfig
from osteoscan.writers import heatmap_name

MISSING_COVARIATES = (
    "no age and sex for this image: neither its DICOM header nor the covariates CSV gives both "
    "(--require-covariates)"
)

if TYPE_CHECKING:
    import torch

    from osteoscan.covariates import Covariates
    from osteoscan.ensemble import Ensemble
    from osteoscan.load import LoadedFrame
    from osteoscan.manifest import Manifest
    from osteoscan.preprocess import PreprocessConfig
    from osteoscan.scan.batch import FrameBatch


@dataclass
class LoadedModel:
    """One model package ready to score: label for the ``model`` column, ensemble, preprocessing."""

    label: str
    ensemble: Ensemble
    preprocess: PreprocessConfig
    manifest: Manifest


def load_models(refs: Sequence[str | Path], device: torch.device) -> list[LoadedModel]:
    """Load each package (default package when ``refs`` is empty) onto ``device``."""
    from osteoscan.ensemble import Ensemble
    from osteoscan.package import load_package
    from osteoscan.preprocess import PreprocessConfig

    out = []
    wanted: list[str | Path | None] = [*refs] or [None]
    for ref in wanted:
        pkg = load_package(ref, device=device)
        m = pkg.manifest
        cfg = PreprocessConfig.from_dict(m.preprocess)
        out.append(LoadedModel(f"{m.name} {m.version}", Ensemble(pkg, device), cfg, m))
    if not out:
        raise OsteoscanError("no model package to scan with")
    return out


def predicted_tscores(manifest: Manifest, member_probs: np.ndarray) -> np.ndarray | None:
    """Predicted T-score per row (image only) of a T-score model; None for other models.

    ``member_probs`` (B, M, C): the members' calibrated probabilities, as
    :class:`~osteoscan.ensemble.BatchPrediction` gives them.
    """
    target = manifest.target or {}
    if target.get("kind") != "tscore":
        return None
    from osteoscan.train.tscore import member_scales, tscore_from_probs

    temps = [float(m.temperature) for m in manifest.members]
    return tscore_from_probs(member_probs, member_scales(target, temps))


class Scorer:
    """Scores collated batches with the loaded models (see the module docstring)."""

    def __init__(self, cfg: ScanConfig, models: Sequence[LoadedModel]) -> None:
        from osteoscan.covariates import CovariateTally

        self.cfg = cfg
        self.models = list(models)
        # resolves each scored image's age/sex (header, then CSV) and counts where they came from
        self.tally = CovariateTally.from_csv(cfg.covariates, cfg.covariate_columns)
        heat_all = cfg.heatmaps_dir is not None and cfg.heatmaps_for == "all"
        self.heatmaps_same_pass = heat_all or (cfg.hdf5 is not None and cfg.hdf5_heatmaps)
        self.heatmaps_flagged = cfg.heatmaps_dir is not None and cfg.heatmaps_for == "flagged"

    def covariates_for(self, rec: LoadedFrame) -> Covariates | None:
        """Header covariates, overridden field by field by the covariates CSV; None if none."""
        from osteoscan.covariates import Covariates

        cov = self.tally.resolve(Covariates(age=rec.age, sex=rec.sex), rec.path, rec.root)
        return None if cov.is_empty() else cov

    def score(self, batch: FrameBatch) -> list[ScoredRow]:
        """One :class:`ScoredRow` per record of ``batch``, in order; routed frames are scored."""
        now = utc_now()
        per_file = Counter(r.path for r in batch.records)
        out = [ScoredRow(ResultRow.from_frame(r, now), per_file[r.path]) for r in batch.records]
        bs = max(1, self.cfg.batch_size)
        for p, idx in batch.rows.items():
            x_all = batch.pixels[p]
            for s in range(0, len(idx), bs):
                self._score(p, idx[s : s + bs], x_all[s : s + bs], batch.records, out)
        return out

    def _score(
        self,
        p: int,
        idx: list[int],
        x: torch.Tensor,
        records: list[LoadedFrame],
        out: list[ScoredRow],
    ) -> None:
        m, cfg = self.models[p], self.cfg
        covs = [self.covariates_for(records[i]) for i in idx]
        if cfg.require_covariates:  # an image without age and sex is an error row, not scored
            keep = [k for k, c in enumerate(covs) if c is not None and None not in (c.age, c.sex)]
            for k in sorted(set(range(len(idx))) - set(keep)):
                row = out[idx[k]].row
                row.status, row.reason = "error", MISSING_COVARIATES
            idx, covs, x = [idx[k] for k in keep], [covs[k] for k in keep], x[keep]
            if not idx:
                return
        # Heatmaps come from the scoring pass itself: for every row when all are wanted (HDF5,
        # --heatmaps-for all), else "flagged": the ensemble opens the Grad-CAM forward for the
        # batch and backpropagates only the rows its fused score flags (about inference cost).
        want: Sequence[bool] | Literal["flagged"] | None = None
        if self.heatmaps_same_pass:
            want = [True] * len(idx)
        elif self.heatmaps_flagged:
            want = "flagged"
        pred = m.ensemble.predict(x, covariates=covs, heatmaps=want, threshold=cfg.threshold)
        inputs = x.numpy()[:, 0] if x.device.type == "cpu" else x.cpu().numpy()[:, 0]
        row_thr = pred.thresholds if pred.thresholds is not None else [pred.threshold] * len(idx)
        classes, folder = m.ensemble.classes, cfg.heatmaps_dir
        tscores = predicted_tscores(m.manifest, pred.member_probs)
        for k, i in enumerate(idx):
            item, row = out[i], out[i].row
            row.model = m.label
            row.probs = {c: float(pred.probs[k, j]) for j, c in enumerate(classes)}
            row.prediction = pred.prediction[k]
            row.score, row.threshold = float(pred.score[k]), float(row_thr[k])
            row.flagged = bool(pred.flagged[k])
            row.uncertainty = float(pred.uncertainty[k])
            row.covariates = pred.covariates_used[k]
            if tscores is not None and hasattr(row, "tscore"):  # the column rows.py declares
                setattr(row, "tscore", float(tscores[k]))  # noqa: B010 - see above
            item.member_probs = np.asarray(pred.member_probs[k])
            item.heatmap = pred.heatmaps[k]
            item.model_input = inputs[k]
            item.geometry, item.display = records[i].geometry, records[i].display
            png = folder is not None and (cfg.heatmaps_for == "all" or row.flagged)
            if png and folder is not None and item.heatmap is not None:
                row.heatmap = str(Path(folder) / heatmap_name(row.image_id))

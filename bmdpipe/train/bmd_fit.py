"""BMD from a decomposed image (seed 004 §3.2, Fig. 4): thresholded mean of the ROI image, linear fit to BMD.

For a site's ROI image, the pixels ≥ t are averaged (the pixel count of the
binarised image is the area, as DXA's bone-edge detection); BMD = a + b·mean.
t is chosen per BMD column to maximise the PCC on the training folds' true
ROI images, and a, b are fitted there, so nothing of the held-out fold is
used. The same fit turns held-out predicted images into BMD (the
"decomposition" method) and held-out true images into the ceiling (seed 004
Table 2's GT row).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from bmdpipe.samples import column_parts


def thresholded_means(images: np.ndarray, t: float) -> np.ndarray:
    """Mean of the pixels ≥ ``t`` per image and channel.

    Args:
        images: ``(N, S, H, W)`` g/cm².
        t: threshold, g/cm².

    Returns:
        ``(N, S)`` g/cm²; 0 where no pixel reaches ``t``.
    """
    mask = images >= t
    count = mask.sum(axis=(2, 3))
    total = np.where(mask, images, 0).sum(axis=(2, 3))
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


@dataclass(frozen=True)
class BmdFit:
    """BMD = intercept + slope · (mean of pixels ≥ threshold) of one site channel.

    Attributes:
        column: the BMD column (e.g. ``dxa_L1``), g/cm² (DXA) or mg/cm³ (QCT).
        channel: index of the site channel in the ROI image.
        threshold: t, g/cm².
        pcc_train: PCC on the training images at ``threshold``.
        curve: PCC for every candidate threshold (Fig. 4's line).
        train_range: min and max of the thresholded mean over the training images, g/cm² (what
            ``bmdpipe predict`` calls a decomposition like the training ones).
    """

    column: str
    channel: int
    threshold: float
    slope: float
    intercept: float
    pcc_train: float
    n_train: int
    curve: dict[str, float]
    train_range: tuple[float, float] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "BmdFit":
        """Inverse of :meth:`to_dict` (``bmd_fit.json``'s entries)."""
        d = dict(d)
        if d.get("train_range") is not None:
            d["train_range"] = tuple(d["train_range"])
        return cls(**d)

    def feature(self, images: np.ndarray) -> np.ndarray:
        """The thresholded mean of the site channel of ``(N, S, H, W)`` images → ``(N,)`` g/cm²."""
        return thresholded_means(images, self.threshold)[:, self.channel]

    def apply(self, images: np.ndarray) -> np.ndarray:
        """BMD of ``(N, S, H, W)`` ROI images → ``(N,)``."""
        return self.intercept + self.slope * self.feature(images)

    def to_dict(self) -> dict:
        return asdict(self)


def fit_column(images: np.ndarray, bmd: np.ndarray, column: str, channel: int,
               thresholds: Sequence[float]) -> BmdFit:
    """Choose t and fit the line for one BMD column on training images.

    Args:
        images: ``(N, S, H, W)`` true ROI images of the training views, g/cm².
        bmd: ``(N,)`` the column's label per view (NaN rows are ignored).
        thresholds: candidates, g/cm².

    Raises:
        ValueError: fewer than 3 labelled views.
    """
    ok = np.isfinite(bmd)
    if ok.sum() < 3:
        raise ValueError(f"{column}: {int(ok.sum())} labelled training views, need at least 3 for the BMD fit")
    y = bmd[ok]
    curve = {}
    for t in thresholds:
        m = thresholded_means(images[ok], t)[:, channel]
        curve[f"{t:g}"] = float(np.corrcoef(m, y)[0, 1]) if m.std() > 0 else float("nan")
    best = max(thresholds, key=lambda t: np.nan_to_num(curve[f"{t:g}"], nan=-2.0))
    m = thresholded_means(images[ok], best)[:, channel]
    slope, intercept = np.polyfit(m, y, 1)
    return BmdFit(column, channel, float(best), float(slope), float(intercept), curve[f"{best:g}"], int(ok.sum()),
                  curve, (float(m.min()), float(m.max())))


def fit_columns(images: np.ndarray, bmd: np.ndarray, columns: Sequence[str], sites: Sequence[str],
                thresholds: Sequence[float]) -> list[BmdFit]:
    """:func:`fit_column` for every BMD column ``{measure}_{site}``, each on its site's channel.

    Args:
        images: ``(N, S, H, W)`` ROI images of the training views, g/cm², channels in ``sites`` order.
        bmd: ``(N, K)`` labels, one column per entry of ``columns`` (NaN rows ignored per column).
        thresholds: candidates, g/cm².
    """
    return [fit_column(images, bmd[:, k], c, list(sites).index(column_parts(c)[1]), thresholds)
            for k, c in enumerate(columns)]

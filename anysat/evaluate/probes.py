"""Linear and k-NN probes under cross-validation: stratified, spatially grouped or blocked
folds, balanced accuracy and macro F1 per fold (scikit-learn's metrics)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

Split = tuple[np.ndarray, np.ndarray]
CELL_DEG = 0.05


@dataclass(frozen=True)
class ProbeScores:
    balanced_accuracy: list[float]
    macro_f1: list[float]

    def summary(self) -> dict:
        ba, f1 = np.array(self.balanced_accuracy), np.array(self.macro_f1)
        return {"balanced_accuracy_mean": float(ba.mean()), "balanced_accuracy_std": float(ba.std()),
                "macro_f1_mean": float(f1.mean()), "macro_f1_std": float(f1.std()),
                "folds": len(ba)}


def grid_cells(lon: np.ndarray, lat: np.ndarray, cell_deg: float = CELL_DEG) -> np.ndarray:
    """A group id per point: the cell_deg x cell_deg lon/lat cell it falls in."""
    ix, iy = np.floor(lon / cell_deg).astype(int), np.floor(lat / cell_deg).astype(int)
    return np.unique(np.stack([ix, iy], 1), axis=0, return_inverse=True)[1].ravel()


def stratified_folds(labels: np.ndarray, n_folds: int = 5, seed: int = 0) -> list[Split]:
    return list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(labels, labels))


def grouped_folds(labels: np.ndarray, groups: np.ndarray, n_folds: int = 5, seed: int = 0
                  ) -> list[Split]:
    """Folds where no group (spatial cell) is in both train and test, classes balanced as far
    as the groups allow."""
    splitter = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
    return list(splitter.split(labels, labels, groups))


def make_probe(method: str, seed: int = 0):
    if method == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0,
                                                                  random_state=seed))
    if method == "knn":
        return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=5))
    raise ValueError(f"unknown probe '{method}'; probes: logreg, knn")


def cross_validate(features: np.ndarray, labels: np.ndarray, splits: list[Split],
                   method: str = "logreg", seed: int = 0) -> ProbeScores:
    """Fit the probe on each fold's train rows, score its test rows."""
    if not np.isfinite(features).all():
        raise ValueError("features hold NaN or infinite values")
    ba, f1 = [], []
    for train, test in splits:
        probe = make_probe(method, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", UserWarning)  # classes absent from a test fold
            probe.fit(features[train], labels[train])
            predicted = probe.predict(features[test])
            ba.append(float(balanced_accuracy_score(labels[test], predicted)))
            f1.append(float(f1_score(labels[test], predicted, average="macro",
                                     labels=np.unique(labels[test]))))
    return ProbeScores(ba, f1)

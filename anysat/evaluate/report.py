"""Run the probe tasks for a checkpoint and write the table (Markdown and JSON)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from .. import storage
from ..devices import device_problem
from ..errors import AnySatError
from ..model import AnySat, load_model
from ..request import DEFAULT_MODEL
from ..resources import catalogs_dir
from .landcover import read_land_cover
from .tasks import S2, crop_types, land_cover
from .worldcereal import read_worldcereal_points

log = logging.getLogger("anysat")

TASKS = ("crop-types", "land-cover")
PRETRAINED, RANDOM = "pretrained", "random-init"


def evaluation_data() -> Path:
    return catalogs_dir() / "evaluation"


def random_twin(model: AnySat, seed: int = 0) -> AnySat:
    """The same architecture with seeded random weights (the `random-init` baseline)."""
    torch.manual_seed(seed)
    return AnySat(model.config).eval()


def evaluate(checkpoint: str = DEFAULT_MODEL, output: str | None = "outputs",
             tasks: tuple[str, ...] = TASKS, data: Path | None = None, max_points: int | None = None,
             seed: int = 0, device: str = "cpu") -> list[dict]:
    """Rows (task, method, probe, split, balanced accuracy and macro F1 mean/std over folds,
    folds, rankme) for raw features, random init and the checkpoint; written to
    `output`/evaluation.{md,json} when `output` is given. The embeddings are computed on
    `device` (fp32, so the table does not depend on it beyond float rounding)."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise AnySatError(f"unknown task(s) {sorted(unknown)}; tasks: {', '.join(TASKS)}")
    if problem := device_problem(device):
        raise AnySatError(problem)
    data = data or evaluation_data()
    model = load_model(checkpoint)
    models = {RANDOM: random_twin(model, seed).to(device), PRETRAINED: model.to(device)}
    rows: list[dict] = []
    if "crop-types" in tasks:
        started = time.perf_counter()
        points = read_worldcereal_points(str(data / "worldcereal" / "test_public_extractions.parquet"))
        if max_points:
            points = points.sample(max_points, seed)
        rows += crop_types(models, points, seed=seed)
        log.info("crop types: %d points, %d classes, %.1f s", len(points.labels),
                 len(set(points.labels)), time.perf_counter() - started)
    if "land-cover" in tasks:
        started = time.perf_counter()
        scene = read_land_cover(data / "eo-learn", list(model.modalities[S2].bands))
        rows += land_cover(models, scene, seed=seed)
        log.info("land cover: %d x %d px, %d dates, %.1f s", *scene.labels.shape,
                 len(scene.dates), time.perf_counter() - started)
    if output is not None:
        out = storage.normalize_uri(output)
        storage.write_bytes_atomic(storage.join(out, "evaluation.json"),
                                   json.dumps(rows, indent=2).encode())
        storage.write_bytes_atomic(storage.join(out, "evaluation.md"),
                                   markdown_table(rows, checkpoint).encode())
    return rows


def markdown_table(rows: list[dict], checkpoint: str = "") -> str:
    """One line per task, split and probe; one column per method: balanced accuracy and
    macro F1 (mean ± std over folds); then RankMe of each method's features per task."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cells = {(r["task"], r["split"], r["probe"], r["method"]): r for r in rows}
    lines = [f"# Probe evaluation{f' of `{checkpoint}`' if checkpoint else ''}", "",
             "Balanced accuracy / macro F1, mean ± std over 5 folds.", "",
             "| task | split | probe | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for key in dict.fromkeys((r["task"], r["split"], r["probe"]) for r in rows):
        values = []
        for method in methods:
            r = cells.get((*key, method))
            values.append("" if r is None else
                          f"{r['balanced_accuracy_mean']:.3f} ± {r['balanced_accuracy_std']:.3f} / "
                          f"{r['macro_f1_mean']:.3f} ± {r['macro_f1_std']:.3f}")
        lines.append("| " + " | ".join(key) + " | " + " | ".join(values) + " |")
    for task in dict.fromkeys(r["task"] for r in rows):
        spread = {r["method"]: r["rankme"] for r in rows if r["task"] == task}
        lines.append(f"| {task} | RankMe of the features | | "
                     + " | ".join(f"{spread.get(m, float('nan')):.1f}" for m in methods) + " |")
    return "\n".join(lines) + "\n"

"""`anysat evaluate` and `anysat embed-points` as a user runs them, on the shipped checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from anysat.evaluate.report import evaluation_data

pytestmark = pytest.mark.integration


def anysat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anysat.cli", *args], capture_output=True,
                          text=True, timeout=900)


def test_evaluate_writes_the_table_for_both_tasks(tmp_path):
    result = anysat("evaluate", "--output", str(tmp_path), "--max-points", "150")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "evaluation.json").read_text())
    keys = {"task", "method", "balanced_accuracy_mean", "balanced_accuracy_std", "macro_f1_mean",
            "macro_f1_std", "folds", "rankme"}
    assert all(keys <= set(r) for r in rows)
    assert {(r["task"], r["method"]) for r in rows} == {
        (t, m) for t in ("crop-types", "land-cover")
        for m in ("raw-features", "random-init", "pretrained")}
    assert {r["split"] for r in rows if r["task"] == "crop-types"} == {"stratified", "spatial"}
    assert all(r["folds"] == 5 and 0 <= r["balanced_accuracy_mean"] <= 1 for r in rows)
    table = (tmp_path / "evaluation.md").read_text()
    assert "| task | split | probe | raw-features | random-init | pretrained |" in table
    assert "| crop-types | spatial | logreg |" in table and "| land-cover | spatial-blocks | knn |" in table
    assert "pretrained" in result.stdout


def test_evaluate_rejects_an_unknown_task(tmp_path):
    result = anysat("evaluate", "--output", str(tmp_path), "--tasks", "crops")
    assert result.returncode == 2
    assert "unknown task(s) ['crops']; tasks: crop-types, land-cover" in result.stderr
    assert not (tmp_path / "evaluation.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU is seen")
def test_evaluate_on_a_missing_gpu_says_so(tmp_path):
    result = anysat("evaluate", "--output", str(tmp_path), "--device", "cuda")
    assert result.returncode == 2
    assert "device 'cuda': this torch sees no CUDA device (a CPU build, or no GPU); use --device cpu" in result.stderr
    assert not (tmp_path / "evaluation.json").exists()


def test_embed_points_cli_on_worldcereal_extractions(tmp_path):
    source = pd.read_parquet(evaluation_data() / "worldcereal" / "test_public_extractions.parquet")
    source.head(7).to_parquet(tmp_path / "points.parquet")
    result = anysat("embed-points", str(tmp_path / "points.parquet"), "--out",
                    str(tmp_path / "vectors.parquet"), "--batch-size", "3")
    assert result.returncode == 0, result.stderr
    vectors = pd.read_parquet(tmp_path / "vectors.parquet")
    assert list(vectors["sample_id"]) == list(source["sample_id"].head(7))
    emb = np.stack(vectors["embedding"])
    assert emb.shape[0] == 7 and np.isfinite(emb).all()
    assert not any(c.startswith("OPTICAL-") for c in vectors.columns)
    missing = anysat("embed-points", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "cannot read points table" in missing.stderr

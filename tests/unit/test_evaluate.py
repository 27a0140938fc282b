"""Probe code on small real subsets: folds, chance level, metrics, point embedding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from anysat.evaluate.landcover import read_land_cover
from anysat.evaluate.position import position_omega2
from anysat.evaluate.probes import (cross_validate, grid_cells, grouped_folds,
                                    stratified_folds)
from anysat.evaluate.report import evaluation_data
from anysat.evaluate.tasks import dense_embeddings, raw_point_features
from anysat.evaluate.worldcereal import read_worldcereal_points
from anysat.modalities import resolve_sensors
from anysat.model import build_model
from anysat.points import (embed_points, embed_points_table, point_footprint_m, points_batch,
                           series_from_table, series_to_table)

DATA = evaluation_data()


@pytest.fixture(scope="module")
def points():
    return read_worldcereal_points(str(DATA / "worldcereal" / "test_public_extractions.parquet"))


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", resolve_sensors(["s2", "s1", "dem"]))


def test_worldcereal_points_in_physical_units(points):
    assert len(points.labels) == 485 and len(set(points.labels)) == 8   # classes with >= 5
    s2, s1 = points.series.values["sentinel-2-l2a"], points.series.values["sentinel-1"]
    assert s2.shape == (485, 12, 9) and s1.shape == (485, 12, 2)
    assert 0.0 < np.nanmedian(s2) < 0.5                                  # reflectance
    assert -25 < np.nanmedian(s1[..., 0]) < -5 < np.nanmedian(s1[..., 0]) + 10  # VV in dB
    assert np.isnan(s2).any() and not np.isinf(s2).any()                # 65535 -> NaN


def test_stratified_folds_keep_class_shares_and_cover_every_point_once(points):
    folds = stratified_folds(points.labels)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested) == list(range(len(points.labels)))
    share = np.mean(points.labels == 1101070000)
    for train, test in folds:
        assert abs(np.mean(points.labels[test] == 1101070000) - share) < 0.05
        assert not set(train) & set(test)


def test_spatial_folds_never_share_a_cell(points):
    cells = grid_cells(points.lon, points.lat)
    assert 5 < len(set(cells)) < len(points.labels)      # 0.05 degree cells group the points
    for train, test in grouped_folds(points.labels, cells):
        assert not set(cells[train]) & set(cells[test])


def test_label_shuffled_probe_scores_at_chance(points, model):
    features = raw_point_features(points.series, model)
    rng = np.random.default_rng(0)
    chance = 1 / len(set(points.labels))
    shuffled = rng.permutation(points.labels)
    score = cross_validate(features, shuffled, stratified_folds(shuffled)).summary()
    assert abs(score["balanced_accuracy_mean"] - chance) < 0.06
    real = cross_validate(features, points.labels, stratified_folds(points.labels)).summary()
    assert real["balanced_accuracy_mean"] > chance + 0.15            # the labels are learnable


def test_metrics_equal_scikit_learn(points, model):
    features = raw_point_features(points.series, model)
    folds = stratified_folds(points.labels)
    scores = cross_validate(features, points.labels, folds, "logreg")
    train, test = folds[2]
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0))
    predicted = probe.fit(features[train], points.labels[train]).predict(features[test])
    assert scores.balanced_accuracy[2] == pytest.approx(
        balanced_accuracy_score(points.labels[test], predicted))
    assert scores.macro_f1[2] == pytest.approx(
        f1_score(points.labels[test], predicted, average="macro"))


def test_batched_point_embedding_equals_one_by_one(points, model):
    subset = points.subset(np.arange(6)).series
    batched = embed_points(model, subset, batch_size=4)
    single = np.concatenate([embed_points(model, subset.subset(np.array([i])), batch_size=1)
                             for i in range(6)])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-5)
    assert np.isfinite(batched).all() and batched.shape == (6, model.config.dim)
    assert not np.allclose(batched[0], batched[1])


def test_embed_points_equals_the_model_on_the_same_series(points, model, tmp_path):
    subset = points.subset(np.arange(10))
    s2_s1 = build_model("tiny", resolve_sensors(["s2", "s1"]))
    table = series_to_table(subset.series, s2_s1, pd.DataFrame({"id": subset.ids}))
    assert series_from_table(table, s2_s1).values["sentinel-1"].shape == (10, 12, 2)
    path, out = tmp_path / "points.parquet", tmp_path / "vectors.parquet"
    table.to_parquet(path)
    assert embed_points_table(str(path), str(out), s2_s1) == 10
    vectors = pd.read_parquet(out)
    assert list(vectors["id"]) == list(subset.ids)
    footprint = point_footprint_m(s2_s1, ["sentinel-2-l2a", "sentinel-1"])
    assert footprint == 10
    with torch.inference_mode():
        direct = s2_s1(points_batch(subset.series, s2_s1, footprint), footprint, "tile").numpy()
    np.testing.assert_allclose(np.stack(vectors["embedding"]), direct, rtol=1e-4, atol=1e-5)


def test_points_table_errors_name_the_problem(model, tmp_path):
    from anysat.errors import ModelInputError

    with pytest.raises(ModelInputError, match="no column of the model's sensors"):
        series_from_table(pd.DataFrame({"x": [1.0]}), model)
    table = pd.DataFrame({"sentinel-1.vv": [[-10.0, -11.0]], "sentinel-1.dates":
                          [np.array(["2021-01-01", "2021-02-01"], dtype="datetime64[D]")]})
    with pytest.raises(ModelInputError, match=r"lacks column\(s\) \['sentinel-1.vh'\]"):
        series_from_table(table, model)


def test_land_cover_scene_and_dense_windows(model):
    scene = read_land_cover(DATA / "eo-learn", list(model.modalities["sentinel-2-l2a"].bands))
    assert scene.values.shape == (5, 9, 101, 100) and scene.labels.shape == (101, 100)
    assert set(np.unique(scene.labels)) == {0, 1, 2, 3, 4, 8}
    crop = scene.crop(40)
    dense = dense_embeddings(model, "sentinel-2-l2a", crop, window_px=20, patch_size_m=20)
    assert dense.shape == (40, 40, 2 * model.config.dim) and np.isfinite(dense).all()
    # the window [0:20, 20:40] embedded alone gives the same pixels
    alone = dense_embeddings(model, "sentinel-2-l2a", crop.window(0, 20, 20), 20, 20)
    np.testing.assert_allclose(dense[0:20, 20:40], alone, rtol=1e-4, atol=1e-5)


def test_position_omega2_tells_plaid_from_land():
    rng = np.random.default_rng(0)
    land = rng.normal(size=(60, 60, 8))
    assert abs(position_omega2(land, 20)) < 0.05
    plaid = np.tile(rng.normal(size=(20, 20, 8)), (3, 3, 1)) + 0.1 * land
    assert position_omega2(plaid, 20) > 0.9


def test_point_series_with_the_30_m_dem_embed_at_a_30_m_footprint(points, model):
    """S2 + S1 series with a DEM height (one timeless value): the footprint is 30 m, each
    point's S2/S1 pixel repeated 3 x 3 and its DEM value once, as the model's own batch."""
    from anysat.points import PointSeries

    subset = points.subset(np.arange(4)).series
    heights = np.array([[[120.0]], [[150.0]], [[180.0]], [[210.0]]], dtype="float32")
    series = PointSeries({**subset.values, "copernicus-dem": heights},
                         {**subset.dates, "copernicus-dem": np.zeros((4, 1), "float32")})
    footprint = point_footprint_m(model, list(series.values))
    assert footprint == 30
    batch = points_batch(series, model, footprint)
    assert batch["sentinel-2-l2a"].shape[-2:] == (3, 3) and batch["copernicus-dem"].shape[-2:] == (1, 1)
    vectors = embed_points(model, series)
    with torch.inference_mode():
        direct = model(batch, footprint, "tile").numpy()
    np.testing.assert_allclose(vectors, direct, rtol=1e-4, atol=1e-5)
    without = embed_points(model, subset)
    assert not np.allclose(vectors, without)  # the height changes the embedding

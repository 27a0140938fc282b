import json

import pytest

from anysat.errors import SpecError
from anysat.modalities import available_specs, load_spec, resolve_sensors
from tests.conftest import DEMO_CATALOG


def test_specs_load_with_bands_and_gsd():
    specs = available_specs()
    assert set(specs) >= {"sentinel-2-l2a", "sentinel-1", "copernicus-dem"}
    s2 = specs["sentinel-2-l2a"]
    assert s2.band_names == ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B11", "B12"]
    assert (s2.gsd_m, s2.time_series) == (10, True)
    assert s2.asset_keys("earth-search")[:3] == ["blue", "green", "red"]
    assert specs["copernicus-dem"].gsd_m == 30 and not specs["copernicus-dem"].time_series


def test_normalisation_statistics_match_the_demo_data():
    stats = json.loads((DEMO_CATALOG / "stats.json").read_text())
    specs = {s.collection("demo"): s for s in available_specs().values()}
    for collection, bands in stats.items():
        for band in specs[collection].bands:
            mean, std = bands[band.name]
            assert band.mean == pytest.approx(mean, rel=1e-3, abs=1e-4)
            assert band.std == pytest.approx(std, rel=1e-3)


def test_aliases_resolve_in_order_without_repeats():
    names = [s.name for s in resolve_sensors(["s1", "s2", "sentinel-2-l2a", "dem"])]
    assert names == ["sentinel-1", "sentinel-2-l2a", "copernicus-dem"]


def test_unknown_sensor_lists_the_known_ones():
    with pytest.raises(SpecError, match=r"unknown sensor\(s\) 'sentinel-9'.*known sensors: .*sentinel-2-l2a"):
        resolve_sensors(["s2", "sentinel-9"])


def test_invalid_spec_names_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngsd_m: -10\ntime_series: true\ncollections: {}\n"
                   "bands: [{name: a, mean: 0, std: 1}]\n")
    with pytest.raises(SpecError, match=r"bad.yaml: invalid modality spec: field 'gsd_m'"):
        load_spec(bad)


def test_missing_provider_collection_is_explained():
    s1 = available_specs()["sentinel-1"]
    with pytest.raises(SpecError, match="no collection on provider 'earth-search'"):
        s1.collection("earth-search")

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


def test_every_sensor_family_has_a_spec():
    """Issue 4: S2 L2A and L1C, S1, Landsat 8/9, NAIP / aerial, DEM."""
    specs = available_specs()
    assert {"sentinel-2-l2a", "sentinel-2-l1c", "sentinel-1", "landsat-c2-l2", "naip",
            "copernicus-dem"} <= set(specs)
    naip = specs["naip"]
    assert (naip.gsd_m, naip.subpatch_px, naip.subpatch_m, naip.time_series) == (1, 10, 10, False)
    assert specs["landsat-c2-l2"].gsd_m == 30 and specs["landsat-c2-l2"].time_series
    assert len(specs["sentinel-2-l1c"].bands) == 10


def test_subpatch_blocks_are_for_single_images_only(tmp_path):
    bad = tmp_path / "ts.yaml"
    bad.write_text("name: x\ngsd_m: 10\ntime_series: true\nsubpatch_px: 4\ncollections: {}\n"
                   "bands: [{name: a, mean: 0, std: 1}]\n")
    with pytest.raises(SpecError, match="ts.yaml: invalid modality spec.*subpatch_px applies"):
        load_spec(bad)


def test_normalisation_statistics_match_the_demo_data_except_elevation():
    """Reflectance and backscatter statistics come from the demo; elevation is scaled
    globally (/ 2000 m), since 1 km2 of Belgium says nothing about the world's heights."""
    stats = json.loads((DEMO_CATALOG / "stats.json").read_text())
    specs = {s.collection("demo"): s for s in available_specs().values() if "demo" in s.collections}
    dem = specs.pop("cop-dem-glo-30")
    assert [(b.mean, b.std) for b in dem.bands] == [(0.0, 2000.0)]
    for collection, bands in stats.items():
        if collection not in specs:
            continue
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
    with pytest.raises(SpecError, match="no collection under the 'earth-search' naming"):
        s1.collection("earth-search")


def test_user_spec_folder_adds_a_sensor_and_a_broken_spec_fails_only_its_runs(tmp_path, monkeypatch):
    from anysat.modalities import modalities_dir

    mine = (modalities_dir() / "sentinel-2-l2a.yaml").read_text()
    mine = mine.replace("name: sentinel-2-l2a", "name: my-s2").replace("aliases: [s2, sentinel-2]",
                                                                     "aliases: [mys2]")
    (tmp_path / "my-s2.yaml").write_text(mine)
    (tmp_path / "broken.yaml").write_text("name: broken\ngsd_m: [not a number\n")
    monkeypatch.setenv("ANYSAT_MODALITIES", str(tmp_path))
    assert [s.name for s in resolve_sensors(["mys2", "s1"])] == ["my-s2", "sentinel-1"]
    with pytest.raises(SpecError, match=r"broken.yaml: cannot read modality spec"):
        resolve_sensors(["s2", "broken"])
    with pytest.raises(SpecError, match=r"unknown sensor\(s\) 's9'.*specs that failed to load: broken"):
        resolve_sensors(["s9"])
    monkeypatch.setenv("ANYSAT_MODALITIES", str(tmp_path / "nowhere"))
    with pytest.raises(SpecError, match="nowhere .*does not exist"):
        resolve_sensors(["s2"])


def test_a_catalog_given_by_path_takes_the_naming_it_is_told(tmp_path, monkeypatch):
    from anysat.stac.providers import resolve_provider

    path = str(DEMO_CATALOG / "catalog.json")
    assert resolve_provider(path).naming == "planetary-computer"
    assert resolve_provider(path, naming="earth-search").naming == "earth-search"
    naip = available_specs()["naip"]
    with pytest.raises(SpecError, match="no collection under the 'earth-search' naming.*--catalog-naming"):
        naip.collection("earth-search")
    # a providers file declares a catalog's naming (and may override a packaged provider)
    (tmp_path / "providers.yaml").write_text(f"mine:\n  kind: static\n  url: {path}\n  naming: demo\n")
    monkeypatch.setenv("ANYSAT_PROVIDERS", str(tmp_path / "providers.yaml"))
    assert resolve_provider("mine").naming == "demo" and resolve_provider("demo").naming == "demo"
    (tmp_path / "bad.yaml").write_text("mine: {url: x}\n")
    monkeypatch.setenv("ANYSAT_PROVIDERS", str(tmp_path / "bad.yaml"))
    with pytest.raises(SpecError, match=r"providers file .*bad.yaml: KeyError: 'kind'"):
        resolve_provider("mine")

import pytest

from anysat.errors import RequestError
from anysat.request import RegionRequest
from tests.conftest import DEMO_BBOX


def build(**kw):
    fields = {"bbox": DEMO_BBOX, "start": "2021-01-01", "end": "2021-06-30", **kw}
    return RegionRequest.build(**fields)


def test_valid_request_keeps_units():
    r = build(patch_size_m=60, tile_size_m=600)
    assert r.geometry.bounds == pytest.approx(DEMO_BBOX)
    assert [s.name for s in r.modality_specs()] == ["sentinel-2-l2a", "sentinel-1", "copernicus-dem"]


def test_start_after_end():
    with pytest.raises(RequestError, match="start 2021-06-30 is after end 2021-01-01"):
        build(start="2021-06-30", end="2021-01-01")


@pytest.mark.parametrize("bbox", [(10, 50, 5, 51), (5, 95, 6, 96), (200, 0, 201, 1)])
def test_bad_bbox(bbox):
    with pytest.raises(RequestError, match=r"west < east \(or west > east across the antimeridian\) and south < north"):
        build(bbox=bbox)


def test_bbox_or_geojson_not_both():
    with pytest.raises(RequestError, match="exactly one of bbox or geojson"):
        build(geojson={"type": "Point", "coordinates": [5.3, 50.6]})


def test_geojson_feature_collection():
    fc = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
          "geometry": {"type": "Polygon", "coordinates": [[[5.32, 50.63], [5.33, 50.63],
                                                           [5.33, 50.635], [5.32, 50.63]]]}}]}
    r = build(bbox=None, geojson=fc)
    assert r.geometry.bounds == pytest.approx((5.32, 50.63, 5.33, 50.635))
    with pytest.raises(RequestError, match="geojson is not a valid"):
        build(bbox=None, geojson={"type": "Feature", "geometry": {"type": "Blob"}})


def test_patch_size_not_multiple_of_gsd_names_the_sensor():
    r = build(patch_size_m=20, tile_size_m=600)
    with pytest.raises(RequestError, match="patch_size_m 20 is not a multiple of the 30 m GSD of sensor 'copernicus-dem'"):
        r.modality_specs()
    assert len(build(patch_size_m=20, sensors=("s2", "s1")).modality_specs()) == 2
    with pytest.raises(RequestError, match="patch_size_m 15 is not a multiple of the 10 m GSD"):
        build(patch_size_m=15, tile_size_m=600, sensors=("s2",)).modality_specs()


def test_tile_size_not_multiple_of_patch():
    with pytest.raises(RequestError, match="tile_size_m 500 is not a multiple of patch_size_m 30"):
        build(tile_size_m=500)


def test_auto_quantize_stores_large_regions_as_int8_and_is_the_same_run_as_int8():
    from anysat.plan import fingerprint

    belgium = (2.5, 49.5, 6.4, 51.5)  # about 55,000 km2
    small = RegionRequest.build(start="2021-01-01", end="2021-06-30", bbox=DEMO_BBOX)
    large = RegionRequest.build(start="2021-01-01", end="2021-06-30", bbox=belgium)
    assert small.quantize == large.quantize == "auto"
    assert small.layer_dtype == "float32" and large.layer_dtype == "int8"
    assert large.model_copy(update={"quantize": "none"}).layer_dtype == "float32"
    specs = large.modality_specs()
    as_int8 = large.model_copy(update={"quantize": "int8"})
    assert fingerprint(large, specs, "sha") == fingerprint(as_int8, specs, "sha")
    assert fingerprint(small, specs, "sha")["quantize"] == "none"


def test_the_cli_options_are_the_request_models_fields():
    """Declared once: every RegionRequest field is an `anysat embed` option (GeoJSON as a
    file path), with the model's type, choices, default and description."""
    import argparse

    from anysat.cli import add_request_arguments, request_from_args

    parser = argparse.ArgumentParser()
    add_request_arguments(parser)
    options = {a.dest: a for a in parser._actions}
    assert set(RegionRequest.model_fields) - {"geojson"} <= set(options)
    assert options["dtype"].choices == ["fp32", "bf16", "fp16"]
    assert "(default: 600.0)" in options["tile_size_m"].help
    assert options["output_uri"].option_strings == ["--output"]
    args = parser.parse_args(["--bbox", "5.3,50.6,5.4,50.7", "--start", "2021-01-01",
                              "--end", "2021-02-01", "--products", "cog,vectors", "--tile-size-m", "1200"])
    request = request_from_args(args)
    default = RegionRequest.build(bbox=(5.3, 50.6, 5.4, 50.7), start="2021-01-01", end="2021-02-01")
    assert request.products == ("cog", "vectors") and request.tile_size_m == 1200
    # what was not given is the model's default, not a second copy of it in the CLI
    assert request.model_dump(exclude={"products", "tile_size_m"}) == default.model_dump(
        exclude={"products", "tile_size_m"})

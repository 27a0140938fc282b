#!/bin/bash
# The packages a GPU machine of the device tool lacks for the pipeline, the trainer, the
# evaluation and the benchmarks, built here for CPython 3.12 on x86-64 and packed as
# .whl/site.tar.xz (ignored by git; the device call carries `.whl`). rasterio's wheel alone is
# 36 MB: packed with xz, all of them fit the call's 64 MiB beside the repository. There:
#     mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
# Which packages: every distribution the imports below load in .venv, at its pinned version,
# less those the machine's image has (its package list, as the device tool's KINDS.md gave it
# on 2026-11-17) and rasterio's optional boto3. Run here, where PyPI is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
pins=$(.venv/bin/python - <<'EOF'
import importlib.metadata as md
import sys

sys.path.insert(0, "benchmarks")
import anysat.cli, anysat.pipeline, anysat.train.trainer, anysat.evaluate.landcover  # noqa: E401,F401
import anysat.products.zarr_layer, embed_region, train_throughput  # noqa: E401,F401

IMAGE = set("""absl-py accelerate aiofiles aiohttp aiosignal anyio attrs certifi charset-normalizer
click cloudpickle filelock fsspec h11 h5py httpcore httpx idna imageio jinja2 joblib markupsafe
matplotlib msgpack multidict networkx numpy packaging pandas pillow pip psutil pyarrow pyyaml
python-dateutil requests rich safetensors scikit-image scikit-learn scipy setuptools six
threadpoolctl tifffile toolz torch tqdm typing-extensions urllib3 werkzeug wrapt xarray yarl
zipp boto3 botocore s3transfer jmespath anysat""".split())
owners = md.packages_distributions()
names = {d for m in list(sys.modules) for d in owners.get(m.split(".")[0], [])}
# a namespace package (pystac) is owned by several distributions: keep each one's pin
for name in sorted(names, key=str.lower):
    if name.lower().replace("_", "-") not in IMAGE:
        print(f"{name}=={md.version(name)}")
EOF
)
echo "$pins" | tr '\n' ' '; echo
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $pins
python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --target .whl/site .whl/*.whl
tar cf - -C .whl/site . | xz -T0 -6 > .whl/site.tar.xz
rm -rf .whl/site .whl/*.whl
du -sh .whl/site.tar.xz

#!/bin/bash
# Every GPU check the open work needs, as one script for one call of the device tool (a lent
# GPU machine: torch there, the rest from .whl/site.tar.xz, made here by gpu_wheels.sh):
#   1. embed-region throughput, base, bf16, 256 tiles of 600 m (92 km2: a GPU's steady rate,
#      not its start) at 16 and 64 tiles per forward, with
#      reader processes (default) and reader threads, and 16 tiles of 2,400 m (the continental
#      deployment's size): km2/s end to end, forward only and reads only
#      (benchmarks/embed_region.py); then the reads alone, processes against threads, 1 to
#      8 readers (benchmarks/block_reads.py: does reading scale to the host's cores?);
#   2. a training step's host and device time, tiny and base, batch 64 and 256
#      (benchmarks/train_step_profile.py);
#   3. pretraining throughput, tiny and base, bf16, batch 64 and 256: samples/s, GPU busy,
#      loader wait (benchmarks/train_throughput.py, chips ingested there in the current format);
#   4. a short base pretraining on the shipped checkpoint's data and its probe table.
# Each step has its own time limit, and writes what it measured under $OUT as it goes, so a
# step cut short still leaves the others' lines (10 files).
# All of it is about 9-10 minutes on an H100, over the device tool's 10-minute limit a call:
# run it as two calls, PART=1 (steps 1: embedding, about 4 min) then PART=2 (steps 2-4:
# training, about 5 min), each with its own $OUT.
#
#   here:  bash benchmarks/gpu_wheels.sh
#   there: PART=1 bash benchmarks/gpu_session.sh     (run: carry [".whl"], timeout_s 330)
#          PART=2 bash benchmarks/gpu_session.sh     (run: carry [".whl"], timeout_s 480)
#   QUICK=1: base only at batch 64, no pretraining (about 4 minutes), when device time is short
#   dry run here on the CPU, small sizes:  DEVICE=cpu PY=.venv/bin/python OUT=/tmp/out bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
PART=${PART:-all}
export PYTHONUNBUFFERED=1
if [ -z "${PY:-}" ]; then  # the device machine: its python3, and the packages carried
    mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site || exit 1
    export PYTHONPATH=/tmp/site:$PWD
    PY=python3
fi
if [ "$DEVICE" = cpu ]; then
    DTYPE=fp32; TRAIN="--models tiny --layouts 1x2 --batch-sizes 8 --workers 1 --steps 20"
    EMBED="--tiles 4 --batch-sizes 4"; EMBED1=$EMBED; EMBED_WIDE="--tiles 1 --batch-sizes 1 --model demo"; READERS="--workers 1 2"; BASE="--model tiny --steps 20 --batch-size 8 --workers 1"
    PROFILE="--models tiny --batch-sizes 8 --steps 2"
else
    DTYPE=bf16; TRAIN="--models tiny,base --layouts 1x4 --batch-sizes 64 256 --workers 12 --steps 30"
    EMBED="--tiles 256 --batch-sizes 16 64"; EMBED1="--tiles 256 --batch-sizes 16"; EMBED_WIDE="--tiles 16 --batch-sizes 4"; READERS="--workers 1 2 4 8"; BASE="--model base --steps 300 --batch-size 64 --workers 12"
    PROFILE="--models tiny,base --batch-sizes 64 256 --steps 5"
fi
[ -n "$QUICK" ] && [ "$DEVICE" != cpu ] && TRAIN="--models base --layouts 1x4 --batch-sizes 64 --workers 12 --steps 20"
step() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.txt"; }

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; nproc
  $PY -c "import torch, anysat.pipeline, anysat.train.trainer, rasterio, odc.stac
print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee -a "$OUT/steps.txt" || exit 1

if [ "$PART" != 2 ]; then
step "embed-region throughput ($EMBED)"
# shellcheck disable=SC2086
timeout 150 $PY benchmarks/embed_region.py --device "$DEVICE" --dtype $DTYPE --model base $EMBED \
    2>&1 | tee "$OUT/embed_region.jsonl"
# shellcheck disable=SC2086
ANYSAT_READER_POOL=threads timeout 60 $PY benchmarks/embed_region.py --device "$DEVICE" --dtype $DTYPE \
    --model base $EMBED1 2>&1 | tee -a "$OUT/embed_region.jsonl"

# shellcheck disable=SC2086
timeout 120 $PY benchmarks/embed_region.py --device "$DEVICE" --dtype $DTYPE --model base \
    --tile-size-m 2400 $EMBED_WIDE 2>&1 | tee -a "$OUT/embed_region.jsonl"

step "reads alone, reader processes against threads ($READERS)"
# shellcheck disable=SC2086
timeout 100 $PY benchmarks/block_reads.py $READERS 2>&1 | tee "$OUT/block_reads.jsonl"
fi
[ "$PART" = 1 ] && { step "done (part 1)"; exit 0; }

step "training step, host against device ($PROFILE)"
# shellcheck disable=SC2086
timeout 75 $PY benchmarks/train_step_profile.py --device "$DEVICE" $PROFILE 2>&1 \
    | grep -v USDT | tee "$OUT/train_step_profile.jsonl"

step "ingest the bench chips (demo catalog, 120 m)"
CHIPS=/tmp/bench-chips
rm -rf $CHIPS
timeout 45 $PY -m anysat.cli ingest --demo --chip-size-m 120 --store $CHIPS --tiles-per-batch 16 \
    > "$OUT/ingest.log" 2>&1 || tail -5 "$OUT/ingest.log"

step "pretraining throughput ($TRAIN)"
# shellcheck disable=SC2086
timeout 150 $PY benchmarks/train_throughput.py --chips $CHIPS --device "$DEVICE" --dtype $DTYPE \
    --stores local --log-every 10 $TRAIN 2>&1 | tee "$OUT/train_throughput.jsonl"

[ -n "$QUICK" ] && [ "$DEVICE" != cpu ] && { step "done (quick)"; exit 0; }
step "short pretraining ($BASE) and its probe table"
rm -rf /tmp/pd /tmp/base-run
timeout 45 $PY -m anysat.cli ingest --demo --chip-size-m 240 --store /tmp/pd/demo > /dev/null 2>&1
timeout 45 $PY -m anysat.cli ingest --catalog catalogs/pretrain/bigearthnet/catalog.json \
    --geojson catalogs/pretrain/bigearthnet/footprints.geojson --start 2017-06-01 --end 2018-02-28 \
    --sensors s2,s1 --chip-size-m 240 --store /tmp/pd/bigearthnet > /dev/null 2>&1
# shellcheck disable=SC2086
timeout 110 $PY -m anysat.cli pretrain --chips /tmp/pd/demo,/tmp/pd/bigearthnet --out /tmp/base-run \
    --sensors s2,s1,dem --lr 1e-4 --sensor-drop 0 --threads 4 --device "$DEVICE" --dtype $DTYPE \
    --log-every 50 --monitor-every 200 --checkpoint-every 200 --json-progress $BASE \
    > "$OUT/pretrain.jsonl" 2> "$OUT/pretrain.log"
tail -3 "$OUT/pretrain.log"
timeout 150 $PY -m anysat.cli evaluate --checkpoint /tmp/base-run/model --output "$OUT/eval" \
    --device "$DEVICE" 2>&1 | tail -14
step "done"

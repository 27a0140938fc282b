#!/bin/bash
# Every GPU check the open work needs, as one script for the device tool (a lent GPU machine:
# torch there, the rest from .whl/site.tar.xz, made here by gpu_wheels.sh):
#   0. the test that a GPU run writes the layer a CPU run writes (PART 1 and all);
#   1. embed-region throughput, base, bf16, 1024 tiles of 600 m (369 km2: 25 squares of up
#      to 8 x 8 tiles on the grid, about 3 for each of the 8 reader processes; 256 tiles
#      were 9 squares, all read at once, so that run mostly measured the wait for them) at 64 tiles per
#      forward, and 36 tiles of 2,400 m (207 km2, the continental deployment's size; 64
#      tiles did not finish in 100 s) at 8 per forward: km2/s end to end, embedding alone
#      (no plan, no preview) and where its stream waited, forward alone and reads alone
#      (benchmarks/embed_region.py); then 256 of those tiles with the forward replaced by zeros
#      (--instant-forward: what the host's reads, batching and writes can feed the GPU, at most
#      45 s); then the base forward alone on 2,400 m tiles,
#      profiled: its kernels, the attention's share, its FLOPs and the TFLOP/s achieved, and
#      the attention with and without its key mask (model_forward.py --profile --flops --attention);
#   2. a training step's host and device time, tiny and base, batch 64, 256 and 1024
#      (benchmarks/train_step_profile.py; PART=2 only);
#   3. one loader process's batches per second (benchmarks/chip_stream.py), then
#      pretraining throughput, tiny and base, bf16, batch 64, 256 and 1024 (on 2026-11-27
#      the GPU was 48 % busy at 256 and its host time per step grew less than its device
#      time with the batch): samples/s, GPU busy, loader wait
#      (benchmarks/train_throughput.py, chips ingested there in the current format);
#   4. a short base pretraining on the shipped checkpoint's data and its probe table.
# Each step has its own time limit, and writes what it measured under $OUT as it goes, so a
# step cut short still leaves the others' lines.
# PART=1: steps 0 and 1 (about 4.5-6.5 min: give it timeout_s 400); PART=2: steps 2-4 (about
# 6.5 min: timeout_s 400), for a session with 15 minutes of device time (the machine starts in
# about 35 s and goes after 30 s idle: start PART=2 at once). PART=all (default) runs steps
# 0, 1, 3 and 4 in one call, which no longer fits the tool's 600 s limit on an H100 (on
# 2026-11-27 a 490 s call, before batch 1024 and the forward profile, ended in the evaluation).
#
#   here:  bash benchmarks/gpu_wheels.sh
#   there: PART=1 OUT=$OUT bash benchmarks/gpu_session.sh   (run: carry [".whl"], timeout_s 400),
#          then at once PART=2 ... (timeout_s 400)
#   QUICK=1: base only at batch 64, no pretraining, when device time is short
#   dry run here on the CPU, small sizes (its 2,400 m tile with the demo model):  DEVICE=cpu PY=.venv/bin/python OUT=/tmp/out bash benchmarks/gpu_session.sh
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
    EMBED="--tiles 4 --batch-sizes 4"; EMBED_CEILING="--tiles 4 --batch-sizes 4"; EMBED_WIDE="--tiles 1 --batch-sizes 1 --model demo"
    FWD_SIZE=tiny; FWD_CASES="600:1"; BASE="--model tiny --steps 20 --batch-size 8 --workers 1"
    PROFILE="--models tiny --batch-sizes 8 --steps 2"
else
    DTYPE=bf16; TRAIN="--models tiny,base --layouts 1x4 --batch-sizes 64 256 1024 --workers 12 --steps 20"
    EMBED="--tiles 1024 --batch-sizes 64"; EMBED_CEILING="--tiles 256 --batch-sizes 64"; EMBED_WIDE="--tiles 36 --batch-sizes 8 --model base"
    FWD_SIZE=base; FWD_CASES="2400:8"; BASE="--model base --steps 300 --batch-size 64 --workers 12"
    PROFILE="--models tiny,base --batch-sizes 64 256 1024 --steps 5"
fi
[ -n "$QUICK" ] && [ "$DEVICE" != cpu ] && TRAIN="--models base --layouts 1x4 --batch-sizes 64 --workers 12 --steps 20"
step() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.txt"; }

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; nproc
  df -h /dev/shm | tail -1  # reader processes hand squares back through it
  $PY -c "import torch, anysat.pipeline, anysat.train.trainer, rasterio, odc.stac
print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee -a "$OUT/steps.txt" || exit 1

if [ "$PART" != 2 ] && [ "$DEVICE" != cpu ]; then
step "the GPU stream writes what the CPU's writes (tests/integration/test_batched_embed.py -k gpu)"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/integration/test_batched_embed.py -k gpu \
    2>&1 | tail -5 | tee -a "$OUT/steps.txt"
fi
if [ "$PART" != 2 ]; then
step "embed-region throughput, 600 m tiles ($EMBED), the default readers"
# shellcheck disable=SC2086
timeout 150 $PY benchmarks/embed_region.py --device "$DEVICE" --dtype $DTYPE --model base $EMBED \
    2>&1 | grep -v WARNING | tee "$OUT/embed_region.jsonl"
if [ "$DEVICE" != cpu ] && ! grep -q '"case"' "$OUT/embed_region.jsonl"; then
    step "no figure from 1,024 tiles (out of time, or of /dev/shm?): 256 tiles"
    timeout 60 $PY benchmarks/embed_region.py --device "$DEVICE" --dtype $DTYPE --model base \
        --tiles 256 --batch-sizes 64 2>&1 | grep -v WARNING | tee -a "$OUT/embed_region.jsonl"
fi
step "the host's ceiling: 600 m tiles ($EMBED_CEILING), the forward replaced by zeros"
# shellcheck disable=SC2086
timeout 45 $PY benchmarks/embed_region.py --device "$DEVICE" --dtype $DTYPE --model base \
    $EMBED_CEILING --instant-forward 2>&1 | grep -v WARNING | tee -a "$OUT/embed_region.jsonl"
step "embed-region throughput, 2,400 m tiles ($EMBED_WIDE), the default readers"
# shellcheck disable=SC2086
timeout 130 $PY benchmarks/embed_region.py --device "$DEVICE" --dtype $DTYPE \
    --tile-size-m 2400 $EMBED_WIDE 2>&1 | grep -v WARNING | tee -a "$OUT/embed_region.jsonl"
step "$FWD_SIZE forward alone, S2+S1+DEM, 30 m patches: its kernels, FLOPs, and its attention with and without the key mask"
for CASE in $FWD_CASES; do  # tile side in metres : tiles per forward
    timeout 60 $PY benchmarks/model_forward.py --size $FWD_SIZE --device "$DEVICE" --dtype $DTYPE \
        --cases s2+s1+dem --patch-m 30 --repeat 2 --profile --flops --attention --side-m "${CASE%:*}" \
        --tiles "${CASE#*:}" 2>&1 | grep -v USDT | tee -a "$OUT/model_forward.jsonl"
done
fi
[ "$PART" = 1 ] && { step "done (part 1)"; exit 0; }

if [ "$PART" = 2 ]; then
step "training step, host against device ($PROFILE)"
# shellcheck disable=SC2086
timeout 100 $PY benchmarks/train_step_profile.py --device "$DEVICE" $PROFILE 2>&1 \
    | grep -v USDT | tee "$OUT/train_step_profile.jsonl"
fi

step "ingest the bench chips (demo catalog, 120 m)"
CHIPS=/tmp/bench-chips
rm -rf $CHIPS
timeout 45 $PY -m anysat.cli ingest --demo --chip-size-m 120 --store $CHIPS --tiles-per-batch 16 \
    > "$OUT/ingest.log" 2>&1 || tail -5 "$OUT/ingest.log"

step "one loader process's batches (benchmarks/chip_stream.py): how many workers a GPU step needs"
timeout 40 $PY benchmarks/chip_stream.py --chips $CHIPS --stores local --batch-sizes 256 1024 \
    --seconds 5 2>&1 | tee "$OUT/chip_stream.jsonl"

step "pretraining throughput ($TRAIN)"
# shellcheck disable=SC2086
timeout 170 $PY benchmarks/train_throughput.py --chips $CHIPS --device "$DEVICE" --dtype $DTYPE \
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
timeout 120 $PY -m anysat.cli evaluate --checkpoint /tmp/base-run/model --output "$OUT/eval" \
    --device "$DEVICE" 2>&1 | tail -14
step "done"

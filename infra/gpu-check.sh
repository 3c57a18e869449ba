#!/usr/bin/env bash
# The GPU paths, run for real on one CUDA machine, with the figures they print:
# bf16 training on the GPU, GPU labelling with and without GradCAM, and the CAM's cost on the GPU.
#   infra/gpu-check.sh [WORKDIR]        (env: FPC=fpc-ray, GPU=--use-gpu, PER_CLASS, SIZE, EPOCHS, BATCH)
set -euo pipefail
FPC=${FPC:-fpc-ray}
GPU=${GPU:---use-gpu}
W=${1:-/tmp/fpc-gpu-check}
PER_CLASS=${PER_CLASS:-400} SIZE=${SIZE:-224} EPOCHS=${EPOCHS:-5} BATCH=${BATCH:-128}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} PYTHONUNBUFFERED=1
rm -rf "$W" && mkdir -p "$W"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, ray; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "ray", ray.__version__)'

$FPC synth "$W/data" --per-class "$PER_CLASS" --seed 1
t0=$(date +%s)
$FPC train --data "$W/data" --output "$W/bundle" --epochs "$EPOCHS" --image-size "$SIZE" \
    --batch-size "$BATCH" --num-workers 1 $GPU --set model.pretrained=none --set train.cpus_per_worker=$(( $(nproc) / 2 ))
echo "train wall $(( $(date +%s) - t0 )) s"
python3 - "$W/bundle/metrics.json" <<'PY'
import json, sys
for h in json.load(open(sys.argv[1])):
    print(f"  epoch {h['epoch']}: {h['images_per_s']:.0f} train images/s, val_top1 {h['val_top1']:.3f}")
PY

# Labelling: each setting runs twice, on a slice (--limit) and on the whole archive, so the
# steady-state rate (the difference of the two) is printed beside the end-to-end one, which
# includes Ray's and the actors' start-up.
label() {  # label OUT CAM WORKERS [--limit N]
  $FPC label --model "$W/bundle" --input "$W/data/Images" --output "$W/$1" --run-id r \
      --cam "$2" $GPU --batch-size "$BATCH" --workers "$3" "${@:4}" >/dev/null
}
for workers in ${LABEL_WORKERS:-1 4}; do
  label "gradcam-$workers-slice" gradcam "$workers" --limit "${SLICE:-600}"
  label "gradcam-$workers-all" gradcam "$workers"
done
label "none-$workers-slice" none "$workers" --limit "${SLICE:-600}"
label "none-$workers-all" none "$workers"
python3 - "$W" <<'PY'
import glob, json, os, sys
runs = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*-*-*/run=r/_SUCCESS.json"))):
    name = path.split(os.sep)[-3]
    s = json.load(open(path))
    runs[name] = (s["rows"], s["timings"]["label_s"])
for name in sorted({n.rsplit("-", 1)[0] for n in runs}):
    (n1, t1), (n2, t2) = runs[f"{name}-slice"], runs[f"{name}-all"]
    cam, workers = name.split("-")
    print(f"  label --cam {cam} --workers {workers}: {n2} images in {t2:.1f}s = {n2 / t2:.0f} images/s end to end; "
          f"steady state {(n2 - n1) / (t2 - t1):.0f} images/s")
PY

# The CAM's own cost on the device: inference vs inference + GradCAM on the same batches.
python3 - "$W/bundle" "$BATCH" "$SIZE" <<'PY'
import sys, time, torch
from fpc_ray.bundle import load_bundle
from fpc_ray.evaluate import autocast
from fpc_ray.label.cam import predict_with_gradcam
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
model = load_bundle(sys.argv[1]).model.to(dev).eval().to(memory_format=torch.channels_last)
x = torch.randn(int(sys.argv[2]), 3, int(sys.argv[3]), int(sys.argv[3]), device=dev).contiguous(memory_format=torch.channels_last)
def timed(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize() if dev.type == "cuda" else None
    t0 = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize() if dev.type == "cuda" else None
    return n * x.shape[0] / (time.perf_counter() - t0)
def plain():
    with torch.inference_mode(), autocast(dev):
        model(x).float().softmax(1)
def cam():
    with autocast(dev):
        predict_with_gradcam(model, x)
a, b = timed(plain), timed(cam)
print(f"  {dev}: inference {a:.0f} images/s, inference+gradcam {b:.0f} images/s, ratio {b / a:.2f}")
if dev.type == "cuda":
    print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
PY

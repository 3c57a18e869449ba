#!/usr/bin/env bash
# One device check on a lent GPU node: `fpc-ray bench gpu`, every ceiling and every ratio of
# issue 13 from one run (about 8 minutes on a 16-core 1-GPU node).
#   here:   infra/gpu-wheels.sh                     (once: what the node lacks, into .whl/)
#   device: run "infra/gpu-check.sh" with carry [".whl"] and timeout_s 600
# The node's image has torch but no Ray: the carried wheels go to /tmp/site, Ray starts without its
# dashboard (its web client is stripped from the wheel) and the bench joins it via RAY_ADDRESS.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fpc-gpu-check}
mkdir -p "$OUT"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Every import the bench needs, now: a missing or mismatched package fails here in seconds, not minutes in.
python3 -c 'import torch, torchvision, ray, ray.data, ray.train.torch, timm, numpy, cv2, pyarrow, pydantic, albumentations, pydicom, pylibjpeg, typing_extensions
from importlib.metadata import version
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "torchvision", torchvision.__version__, "ray", ray.__version__,
      "timm", timm.__version__, "numpy", numpy.__version__, "cv2", cv2.__version__, "pyarrow", pyarrow.__version__,
      "typing_extensions", version("typing_extensions"))'
# Ray is told the GPUs torch sees: a GPU Ray missed would leave the GPU stages waiting forever.
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
python3 -m ray.scripts.scripts start --head --port=6390 --include-dashboard=false --disable-usage-stats --num-gpus="$GPUS" >/dev/null
trap 'python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true' EXIT
export RAY_ADDRESS=127.0.0.1:6390
rm -rf /tmp/fpc-bench-gpu  # a rerun on a warm node: the archives' hard links and the bundle would refuse it
python3 -m fpc_ray bench gpu --workdir /tmp/fpc-bench-gpu --json "$OUT/bench-gpu.json" "$@" 2>&1 | tee "$OUT/bench-gpu.log"

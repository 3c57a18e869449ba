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
python3 -c 'import torch, ray; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "ray", ray.__version__)'

python3 -m ray.scripts.scripts start --head --port=6390 --include-dashboard=false --disable-usage-stats >/dev/null
trap 'python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true' EXIT
export RAY_ADDRESS=127.0.0.1:6390
python3 -m fpc_ray bench gpu --workdir /tmp/fpc-bench-gpu --json "$OUT/bench-gpu.json" "$@" 2>&1 | tee "$OUT/bench-gpu.log"

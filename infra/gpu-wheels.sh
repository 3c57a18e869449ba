#!/usr/bin/env bash
# Prepare what a lent GPU node lacks, as wheels in .whl/ (git-ignored), under the 64 MiB that a
# device call may carry: the node's image has Python 3.12, torch, torchvision, timm, pyarrow,
# OpenCV, scipy, pandas, typer and matplotlib, but no Ray, pydantic, albumentations or pydicom.
# Ray's wheel (79 MB) is stripped of what a headless bench never loads (Java jars, RLlib, Serve,
# LLM, the dashboard's web client, tests); its RECORD is rewritten to match.
#   infra/gpu-wheels.sh            then: device run with carry [".whl"] and infra/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
W=.whl
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
rm -rf "$W" && mkdir -p "$W"
PLATFORMS=()
for tag in manylinux_2_{39,35,34,31,28,27,24,17}_x86_64 manylinux2014_x86_64; do PLATFORMS+=(--platform "$tag"); done
# Pinned to what this project's own environment resolved, so the node runs the same code.
PY=${PYTHON:-.venv/bin/python}
pkgs=()
for name in ray pydantic pydantic_core annotated-types typing-inspection typing-extensions albumentations albucore stringzilla \
            simsimd pydicom pylibjpeg pylibjpeg-libjpeg jsonschema jsonschema-specifications referencing \
            rpds-py tensorboardX; do
  v=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}')
  pkgs+=("$name${v:+==$v}")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$W" "${pkgs[@]}" 2> >(grep -v "^WARNING: Location" >&2)

python3 - "$W" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "ray-*.whl"))[0]
drop = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/", "ray/tests/",
        "ray/data/tests/", "ray/train/tests/", "ray/tune/tests/", "ray/util/tests/")
stripped = wheel + ".tmp"
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if item.filename.startswith(drop):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True)
                            if not line.decode().startswith(drop))
        dst.writestr(item, data)
os.replace(stripped, wheel)
PY
du -ch "$W"/*.whl | tail -1

#!/usr/bin/env bash
# Fetch, into .whl/, the wheels a GPU machine without internet needs beside its own CUDA torch,
# for bench/gpu_check.sh: Ray, Optuna, mlxtend and what they need that such an image lacks.
#
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]        (default 3.12, the GPU image's Python)
#
# Ray's wheel (79 MB) holds a 32 MB Java jar and source maps that nothing here uses; they are
# dropped so that the wheels travel with the working tree in under 64 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
tag=cp${version/./}
rm -rf .whl && mkdir .whl  # one version of each: two would stop the offline install
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
    --python-version "$version" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "ray==${RAY_VERSION:-2.60.0}" \
    optuna alembic mako sqlalchemy colorlog mlxtend tensorboardx jsonschema \
    jsonschema-specifications referencing rpds-py pydantic pydantic-core annotated-types \
    typing-inspection typing-extensions
python3 - "$tag" <<'EOF'
import sys, zipfile
from pathlib import Path

wheel = next(Path(".whl").glob(f"ray-*-{sys.argv[1]}-*.whl"))
unused = lambda name: name.startswith("ray/jars/") or name.endswith(".js.map")
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
    for info in source.infolist():
        if unused(info.filename):
            continue
        data = source.read(info)
        if info.filename.endswith(".dist-info/RECORD"):  # the dropped files leave the record too
            lines = data.decode().splitlines()
            data = "\n".join(line for line in lines if not unused(line.split(",")[0])).encode()
        target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
slim.replace(wheel)
EOF
du -sh .whl

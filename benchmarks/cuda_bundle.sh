#!/usr/bin/env bash
# Prepares what benchmarks/cuda_check.py needs on a GPU machine that has torch and transformers but no network:
# wheels for Python 3.12 in .whl/ (DeepSpeed and the light packages the trainer imports; pyarrow stripped of
# Flight, S3 and its tests to fit a 64 MiB transfer) and device-inputs/ (a model and a pairs dataset).
#   bash benchmarks/cuda_bundle.sh MODEL_DIR PAIRS_DIR
# Then, on the GPU machine, from the repository root, run the command printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 pairs=$2 py=${PYTHON_VERSION:-3.12}
rm -rf .whl device-inputs && mkdir -p .whl device-inputs
cp -r "$model" device-inputs/model && cp -r "$pairs" device-inputs/pairs
pip download -q --no-deps -d .whl --python-version "$py" --only-binary=:all: hjson py-cpuinfo einops msgpack ninja \
  nvidia-ml-py psutil pydantic pydantic-core annotated-types typing-inspection rich markdown-it-py mdurl pygments numpy
pip download -q --no-deps -d .whl --no-binary=:all: deepspeed==0.19.8
DS_BUILD_OPS=0 pip wheel -q --no-deps --no-build-isolation .whl/deepspeed-*.tar.gz -w .whl && rm .whl/deepspeed-*.tar.gz
tmp=$(mktemp -d) && pip download -q --no-deps -d "$tmp" --python-version "$py" --only-binary=:all: pyarrow==26.0.1
(cd "$tmp" && unzip -q pyarrow-*.whl && rm -rf pyarrow/tests pyarrow/include pyarrow/src pyarrow/*flight* \
  pyarrow/libarrow_s3* pyarrow/_s3fs* pyarrow/libarrow_python.so pyarrow/libarrow_python.so.*.*.* \
  && zip -q -9 -r "$OLDPWD/.whl/pyarrow-site.zip" pyarrow pyarrow-*.dist-info)
rm -rf "$tmp"
grep -qx "/device-inputs/" .git/info/exclude 2>/dev/null || echo "/device-inputs/" >> .git/info/exclude
du -sh .whl device-inputs
cat <<'RUN'
carry .whl and device-inputs, then run:
python -m pip install -q --no-index --find-links .whl deepspeed==0.19.8 rich numpy; python -c "import pyarrow" 2>/dev/null || (mkdir -p /tmp/site && cd /tmp/site && unzip -q "$OLDPWD/.whl/pyarrow-site.zip"); mkdir -p /tmp/pkg && cp -r rayalign /tmp/pkg/ && for d in actors pipelines cluster; do ln -sfn $PWD/$d /tmp/pkg/rayalign/$d; done; export PYTHONPATH=/tmp/pkg:/tmp/site; python benchmarks/cuda_check.py --model device-inputs/model --pairs device-inputs/pairs --out /tmp/cc; cp /tmp/cc/cuda_check.json $OUT/
RUN

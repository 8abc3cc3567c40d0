#!/usr/bin/env bash
# The GPU check in one go: setup, the CUDA tests, packs against lone trials, trials packed onto
# the GPU (fractions and packs), per-model throughput, the trainer's own rate beside the bare
# step's, the step's sync and launch costs. Each part's output goes to RESULTS/<part>.log.
#
#   bash bench/gpu_check.sh [RESULTS]        (RESULTS defaults to $OUT)
#
# Setup follows README (a venv with `pip install -e '.[dev]'`). On a machine without internet,
# put the wheels of what its Python lacks in .whl/: they are installed offline into .gpu-site,
# beside the machine's own CUDA build of torch, and used from there (bench/gpu_wheels.sh
# fetches them).
# GPU_CHECK_PARTS="setup tests ..." runs only the parts named (setup is needed once per machine).
# Every part has a time limit and the whole run a deadline (GPU_CHECK_SECONDS, 570 s): a part
# that would not fit is skipped and says so, and one that fails does not stop the others.
set -uo pipefail

export results=${1:-${OUT:?give a results folder, or set OUT}}
mkdir -p "$results"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 GVAE_CACHE=${GVAE_CACHE:-$PWD/.gvae-cache} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-570}))
export venv=.venv-gpu py=.venv-gpu/bin/python
if [[ -d .whl ]]; then  # the machine's own Python (its CUDA torch) plus the wheels, no venv
    export py=python3 PYTHONPATH=$PWD/.gpu-site:$PYTHONPATH
fi

part() {  # part NAME LIMIT COMMAND...: run with a limit, log to RESULTS/NAME.log
    local name=$1 limit=$2 left=$((deadline - SECONDS))
    shift 2
    if [[ -n ${GPU_CHECK_PARTS:-} && " $GPU_CHECK_PARTS " != *" $name "* ]]; then
        return  # not among the parts asked for
    fi
    if ((left < 20)); then
        echo "== $name: skipped, ${left}s left of the deadline" | tee "$results/$name.log"
        return
    fi
    ((limit > left - 5)) && limit=$((left - 5))
    echo "== $name (limit ${limit}s) at $(date +%T)"
    local start=$SECONDS
    if declare -F "$1" > /dev/null; then  # a function of this script: run it in a child bash
        export -f "$1"
        set -- bash -c "$1"
    fi
    timeout -k 5 "$limit" "$@" > "$results/$name.log" 2>&1
    local code=$?
    echo "== $name: exit $code after $((SECONDS - start))s"
    tail -n 40 "$results/$name.log"
}

setup() {
    if [[ -d .whl ]]; then
        python3 -m pip install -q --no-index --no-deps --upgrade --target .gpu-site .whl/*.whl || return
    else
        python3 -m venv "$venv" && "$venv/bin/pip" install -q -e '.[dev]' || return
    fi
    nvidia-smi
    "$py" -c 'import torch, ray, optuna, gvae; print("torch", torch.__version__,
        "cuda", torch.version.cuda, torch.cuda.get_device_name(0), "| ray", ray.__version__,
        "| optuna", optuna.__version__)'
}

gpu_short() {  # studies/gpu_short.yaml, its tables and report kept in RESULTS/gpu_short
    [[ " ${GPU_CHECK_PARTS:-} " == *" gpu_short "* ]] || { echo "not asked for"; return; }
    "$py" -m gvae.cli study run studies/gpu_short.yaml --storage "$results/gpu_short"
    "$py" -m gvae.cli report gpu_short --storage "$results/gpu_short"
}

# In order of what matters most, so a run cut short by its deadline keeps the rest.
part setup 150 setup
part tests 240 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_divergence.py tests/test_pack.py tests/test_graphs.py
part graph_rate 150 "$py" bench/trainer_rate.py --device cuda --iterations 3000 --pack 8
part gpu_short 400 gpu_short  # only when asked for: GPU_CHECK_PARTS="setup gpu_short"
part pack_benchmark 120 "$py" bench/pack_benchmark.py --device cuda --packs 1 5 8 32 128
part packing 260 "$py" bench/packing_benchmark.py --storage "$PWD/.packing" --iterations 200 --fractions 1 0.0625 0.2:5 0.2:32
part benchmark 100 "$py" bench/benchmark.py --device cuda --repeats 3
# The same under the cuBLAS workspace setting the trainer makes for determinism: whether it is
# what slows a lone trial in the trainer below benchmark.py's rate.
part benchmark_cublas 100 env CUBLAS_WORKSPACE_CONFIG=:4096:8 "$py" bench/benchmark.py --device cuda --repeats 3
part gpu_step 150 "$py" bench/gpu_step.py --iterations 100 --repeats 3
part compile 90 "$py" bench/gpu_step.py --models gan --compile --iterations 100
echo "== done at $(date +%T), ${SECONDS}s"

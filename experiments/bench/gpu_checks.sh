#!/usr/bin/env bash
# The GPU rows of the train-step (issue 7) and decode (issue 8) benchmarks, in one command for a
# lent GPU machine whose image has jax[cuda], flax, optax, orbax, torch and transformers but not
# this project's other runtime packages. Carry them as wheels in .whl/ (Python 3.12 builds):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl \
#     ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker
# (not flax: the image's flax matches its jax; flax 0.12.8 fails to import on jax 0.11.2)
# then run `bash experiments/bench/gpu_checks.sh` there (PARTS picks what runs, below).
# Logs go to $OUT (or /tmp/gpu_checks).
# Each part has its own time limit so one failure still leaves the other's table.
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
if [ -d .whl ]; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"
# Parts (space-separated in PARTS):
#   train: MFU rows of cm3leon_350m, one per TRAIN_VARIANTS entry
#     batch:remat[:attention[:override,...]]; TRAIN_ARGS adds e.g. --hlo-dir DIR;
#   decode: bench preset vs HF OPT generate on the same GPU (batch 1 and 8, +-CFG), then the
#     350M bandwidth check;
#   profile: experiments/bench/gpu_profile.py, device time by kernel of the 350M train step
#     and batch-1 decode (PROFILE_ARGS adds options);
#   matvec: experiments/bench/matvec.py, XLA's batch-1 projections vs the fused Pallas
#     kernels, then the 350M bandwidth check with XLA's dots, the fused projections and the
#     fused projections + the Pallas decode-attention kernel (MATVEC_ARGS="--tilings
#     512:4:512 256:8:1024" adds rows with other kernel tilings).
PARTS=${PARTS:-train decode}
for part in $PARTS; do
  case $part in
    train)
      timeout "${TRAIN_LIMIT:-170}" python3 experiments/bench/train_step.py --rounds 3 --steps 3 \
        --gpu-variants \
        ${TRAIN_VARIANTS:-8:none:cudnn_packed 8:none:cudnn_packed:model.scan_layers=true} \
        ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train_step.log" ;;
    decode)
      # JAX leaves half the GPU's memory to torch.
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout "${DECODE_LIMIT:-230}" python3 \
        experiments/bench/decode.py --repeats 2 --repeats-large 1 2>&1 | tee "$OUT/decode.log" ;;
    profile)
      timeout "${PROFILE_LIMIT:-200}" python3 experiments/bench/gpu_profile.py \
        --trace-dir /tmp/gpu_profile ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile.log" ;;
    matvec)
      timeout "${MATVEC_LIMIT:-300}" python3 experiments/bench/matvec.py ${MATVEC_ARGS:-} 2>&1 \
        | tee "$OUT/matvec.log" ;;
    *) echo "unknown part $part (train, decode, profile, matvec)"; exit 2 ;;
  esac
done

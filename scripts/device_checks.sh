#!/usr/bin/env bash
# The GPU checks of issues 4 and 6 in ONE device call, in priority order; each step runs under its own
# timeout (and a global budget) and writes its results under $OUT as soon as it is done, so a step that fails
# or runs out of time loses nothing of the steps before it.
#
#   bash scripts/device_checks.sh prepare       # on the CPU box: copy what the checks read into .devdata/
#   bash scripts/device_checks.sh [STEP ...]    # on the device; default: env ops export train bench
#   DEVICE=cpu bash scripts/device_checks.sh    # dry run of the same steps on the CPU, tiny sizes
#
# Steps (device; the default order puts the GPU parity before training):
#   env     versions, GPU, and that every module the steps import is there          -> env.txt
#   ops     issue 6: scripts/check_max_ops.py, each op of the SpeechLM graph (matmuls, gather, rms_norm,
#           SwiGLU, RoPE, attention) per row count in bf16 and float32 against float64  -> ops.json, ops.md
#   train   issue 4: `train.py stage=pretrain experiment=base trainer=gpu` from scratch (bf16-mixed), 30
#           optimizer steps of 16 x 2048 tokens (micro-batches + accumulation when 16 rows do not fit), on
#           random-code shards of the base codebook over the quickstart utterances  -> train/, train_bench.*
#   export  issue 6: export.py device=gpu dtype=bfloat16 (the parity gate, measured values written whether it
#           passes or not)                                                          -> export-bf16/, parity-bf16/
#   bench   issue 6: scripts/bench_export.py on the GPU in bf16, quickstart model + codec, then a random-init
#           base-shaped SpeechLM                                                    -> bench_export_*.json
#   export-f32  (extra, if asked) the same export in float32 on the GPU, then the prediction its
#           thresholds were set from (scripts/emulate_gpu_float32.py, on the host; alone: step `emulate`)
#                                                                           -> parity-f32/, emulated-f32/
#
# A GPU visit (a device call carries 64 MiB; the machine has no registry), from the CPU box:
#   ../shared/device/stage-wheels.sh hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 \
#       multiprocess==0.70.19 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 jiwer==4.0.0 rapidfuzz==3.14.6
#   SPEECHLM_RUN=runs/sft/quickstart bash scripts/device_checks.sh prepare  # .devdata/, antlr4's wheel too
# then device calls back to back: the stash calls stage-wheels prints, and its last call with only
# `bash .device/pN/install.sh`; then carry [".devdata"] with `bash scripts/device_checks.sh env ops` (the
# steps keep .devdata in /root/devdata for later calls and install its wheels); then, carrying nothing,
# `bash scripts/device_checks.sh export`, and so on. Hand the machine back after the last.
#
# Environment: SPEECHLM_RUN (the run prepare copies, default runs/rlhf/quickstart), DEVICE (gpu|cpu, default
# gpu), OUT (default /tmp/device-checks), WORK (scratch, default /tmp/voxlm-device), BUDGET_S (whole run,
# default 450), PY (default python3; .venv/bin/python for cpu), TRAIN_MB (micro-batch rows; default: 8 on a
# >= 120 GiB GPU, else 4; halved on out-of-memory), TRAIN_STEPS (30), TRAIN_WARMUP (5), MODULAR_CACHE_DIR
# (default /root/modular-cache on the GPU), DRY_DTYPE (the SpeechLM dtype of a CPU dry run, default float32).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
DEVICE=${DEVICE:-gpu}
OUT=${OUT:-/tmp/device-checks}
WORK=${WORK:-/tmp/voxlm-device}
DATA=.devdata
STARTED=$(date +%s)
BUDGET_S=${BUDGET_S:-450}

log() { echo "[$(date +%T) +$(( $(date +%s) - STARTED ))s] $*"; }

# ------------------------------------------------------------------------------------------ CPU box: prepare
prepare() {
  set -e
  local py=${PY:-.venv/bin/python}
  grep -qx '/.devdata/' .git/info/exclude 2>/dev/null || echo '/.devdata/' >> .git/info/exclude
  local speechlm=${SPEECHLM_RUN:-runs/rlhf/quickstart}
  rm -rf $DATA && mkdir -p $DATA/runs/rlhf/quickstart/hf $DATA/runs/codec/quickstart
  # hydra's parser runtime has no wheel on PyPI, and the GPU machine cannot build one
  "$py" -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w $DATA/whl
  # The SpeechLM (hf/ only; under the name the steps read), the codec (codec.pt + its config), the
  # utterances of the quickstart tokenize run.
  cp $speechlm/hf/{config.json,generation_config.json,model.safetensors,speech_layout.json} \
     $speechlm/hf/{tokenizer.json,tokenizer_config.json} $DATA/runs/rlhf/quickstart/hf/
  echo "$speechlm" > $DATA/runs/rlhf/quickstart/SOURCE
  cp runs/codec/quickstart/{codec.pt,config.yaml} $DATA/runs/codec/quickstart/
  for split in train val; do
    mkdir -p $DATA/tokenize-quickstart/shards/$split
    cp runs/tokenize/quickstart/shards/$split/{index.jsonl,meta.json} $DATA/tokenize-quickstart/shards/$split/
  done
  # The corpus rows the parity gate reads: every row's metadata of test_seen and train (so it picks the same
  # prompts), audio only for the chosen targets and references (the others get a 10 ms silent WAV).
  nice -n 10 "$py" - <<'EOF'
import io
from pathlib import Path

import datasets
import numpy as np
import soundfile as sf
from hydra import compose, initialize_config_dir

from voxlm.eval.tts_eval import build_cases

with initialize_config_dir(config_dir=str(Path("configs").resolve()), version_base="1.3"):
    cfg = compose("export", overrides=["experiment=quickstart"])
gate = cfg.parity
args = (gate.split, gate.reference_split, 16000, int(gate.utterances), float(gate.max_prompt_seconds))
cases = build_cases(cfg.data, *args)
keep = {c.id for c in cases} | {c.reference_id for c in cases}
silence = io.BytesIO()
sf.write(silence, np.zeros(160, np.float32), 16000, format="WAV", subtype="PCM_16")
placeholder = {"bytes": silence.getvalue(), "path": None}
source = datasets.load_from_disk(cfg.data.path)
subset = {}
for split in sorted({gate.split, gate.reference_split}):
    table = source[split].cast_column("audio", datasets.Audio(decode=False))
    table = table.map(lambda row: row if row["id"] in keep else {**row, "audio": placeholder})
    subset[split] = table.cast_column("audio", source[split].features["audio"])
datasets.DatasetDict(subset).save_to_disk(".devdata/corpus-quickstart-parity")
cfg.data.path = ".devdata/corpus-quickstart-parity"
again = build_cases(cfg.data, *args)
assert [(c.id, c.reference_id) for c in again] == [(c.id, c.reference_id) for c in cases]
assert all(np.array_equal(a.audio, b.audio) and np.array_equal(a.reference_audio, b.reference_audio)
           for a, b in zip(again, cases, strict=True))
print("parity corpus:", [(c.id, c.reference_id) for c in cases])
EOF
  du -sh $DATA $DATA/* | sed 's/^/  /'
  local bytes
  bytes=$(du -sb $DATA | cut -f1)
  echo "  .devdata: $((bytes / 1048576)) MiB (a device call carries 64 MiB in all, the working tree included)"
}

case "${1:-}" in
  prepare) prepare; exit $? ;;
esac

# ------------------------------------------------------------------------------------------ device (or dry run)
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(env ops export train bench)
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1 TOKENIZERS_PARALLELISM=false
if [ "$DEVICE" = gpu ]; then
  PY=${PY:-python3}
  # .devdata comes in a call of its own (with the wheels it would pass 64 MiB): kept for the later calls
  if [ -d "$DATA" ] && [ ! -L "$DATA" ]; then
    rm -rf /root/devdata && cp -r "$DATA" /root/devdata
  elif [ ! -e "$DATA" ] && [ -d /root/devdata ]; then
    ln -s /root/devdata "$DATA"
  fi
  if [ -d "$DATA/whl" ] && ! PYTHONPATH=/root/site "$PY" -c "import antlr4" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /root/site "$DATA"/whl/*.whl
  fi
  [ -d /root/site ] && export PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH}
  export MODULAR_CACHE_DIR=${MODULAR_CACHE_DIR:-/root/modular-cache}
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  DTYPE=bfloat16
else
  PY=${PY:-$ROOT/.venv/bin/python}
  DTYPE=${DRY_DTYPE:-float32}
fi
# voxlm without installing it (pip install -e needs setuptools >= 77): a link named voxlm to src/.
if ! "$PY" -c "import voxlm" 2>/dev/null; then
  mkdir -p "$WORK/shim" && ln -sfn "$ROOT/src" "$WORK/shim/voxlm"
  export PYTHONPATH=$WORK/shim${PYTHONPATH:+:$PYTHONPATH}
fi
printf 'step\trc\tseconds\n' > "$OUT/steps.tsv"

left() { echo $(( BUDGET_S - ($(date +%s) - STARTED) )); }
mef_count() { ls "${MODULAR_CACHE_DIR:-$HOME/.cache/modular}/.max_cache/mof/mef/"*/ 2>/dev/null | wc -l; }
MEFS_BEFORE=$(mef_count)

# run NAME LIMIT_S CMD...: the command under `timeout` (never past the budget), output to $OUT/NAME.log.
run() {
  local name=$1 limit=$2; shift 2
  local budget; budget=$(( $(left) - 5 ))
  [ "$budget" -lt "$limit" ] && limit=$budget
  if [ "$limit" -lt 20 ]; then
    log "$name: skipped, ${budget}s of the budget left"; printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"
    return 124
  fi
  log "$name (limit ${limit}s): $*"
  echo "\$ $*" > "$OUT/$name.log"
  local t0; t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/steps.tsv"
  log "$name: rc=$rc in $(( $(date +%s) - t0 ))s"
  [ $rc -eq 0 ] || tail -n 15 "$OUT/$name.log" | sed 's/^/    /'
  return $rc
}

step_env() {
  {
    echo "device=$DEVICE date=$(date -u +%FT%TZ) host=$(hostname)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
    echo "MODULAR_CACHE_DIR=${MODULAR_CACHE_DIR:-} compiled graphs there: $(mef_count)"
    "$PY" - <<'EOF'
import importlib, importlib.metadata, sys
print("python", sys.version.split()[0], sys.executable)
missing = []
for name in ("torch", "transformers", "lightning", "tokenizers", "huggingface_hub", "numpy", "pyarrow",
             "datasets", "hydra", "omegaconf", "soundfile", "jiwer", "max", "voxlm"):
    try:
        module = importlib.import_module(name)
        dist = {"hydra": "hydra-core", "max": "max"}.get(name, name)
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = getattr(module, "__version__", "?")
        print(f"{name} {version} {getattr(module, '__file__', '')}")
    except Exception as error:  # noqa: BLE001
        missing.append(name)
        print(f"{name} MISSING: {type(error).__name__}: {error}")
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda {torch.version.cuda}: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
for name in ("voxlm.speechlm.stage", "voxlm.export.build", "voxlm.export.speechlm", "voxlm.export.codec"):
    try:
        importlib.import_module(name)
        print("import", name, "ok")
    except Exception as error:  # noqa: BLE001
        missing.append(name)
        print(f"import {name} FAILED: {type(error).__name__}: {error}")
if "max" not in missing:
    from max.driver import Accelerator, accelerator_count
    if accelerator_count():
        device = Accelerator()
        print("max accelerator:", device.api, device.architecture_name)
sys.exit(1 if missing else 0)
EOF
  } > "$OUT/env.txt" 2>&1
  local rc=$?
  printf 'env\t%s\t0\n' "$rc" >> "$OUT/steps.tsv"
  log "env: rc=$rc"; cat "$OUT/env.txt" | sed 's/^/    /'
  return $rc
}

step_train() {
  local shards=$WORK/runs/tokenize/base-random rows=16 seq=2048 steps=${TRAIN_STEPS:-30}
  local warmup=${TRAIN_WARMUP:-5} trainer=gpu extra=() mb=${TRAIN_MB:-auto}
  if [ "$DEVICE" = cpu ]; then  # the same command at toy sizes: the base vocabulary, a 2-layer 64-wide model
    rows=2 seq=256 steps=${TRAIN_STEPS:-6} warmup=${TRAIN_WARMUP:-2} trainer=cpu mb=${TRAIN_MB:-1}
    extra=(speechlm.model.hidden_size=64 speechlm.model.intermediate_size=128 speechlm.model.num_hidden_layers=2
           speechlm.model.num_attention_heads=4 speechlm.model.num_key_value_heads=2 speechlm.model.head_dim=16
           speechlm.pretrain.num_workers=2)
  fi
  run train-shards 60 "$PY" scripts/bench_train.py shards --source $DATA/tokenize-quickstart/shards \
      --out "$shards" --text-out "$WORK/text.txt" || return $?
  if [ "$mb" = auto ]; then  # measured on the CPU: ~2.9 MB of saved activations per token, ~23 GB of weights,
    # gradients and AdamW state: 16 x 2048 rows need ~155 GB, 8 ~90 GB, 4 ~56 GB
    mb=$("$PY" -c "import torch; print(8 if torch.cuda.get_device_properties(0).total_memory >= 120 * 2**30 else 4)")
    [[ "$mb" =~ ^[0-9]+$ ]] || mb=4
  fi
  local rc=1 name cmd
  while [ "$mb" -ge 1 ]; do
    name=bench-$DEVICE-mb$mb
    cmd=(stage=pretrain experiment=base trainer=$trainer logger=csv run_name=$name paths.runs_dir=$WORK/runs
         stage.tokenize_run=base-random speechlm.model.init_from=null speechlm.tokenizer.path=null
         speechlm.tokenizer.vocab_size=128254 speechlm.pretrain.text_corpus=$WORK/text.txt
         speechlm.pretrain.max_steps=$steps speechlm.pretrain.batch_size=$mb
         speechlm.pretrain.accumulate_grad_batches=$(( rows / mb )) speechlm.pretrain.seq_len=$seq
         trainer.log_every_n_steps=1 trainer.enable_progress_bar=false "${extra[@]}")
    run "train-mb$mb" 300 "$PY" scripts/bench_train.py run --timing "$OUT/train_timing_mb$mb.json" \
        --warmup-steps "$warmup" --no-save -- "${cmd[@]}"
    rc=$?
    if [ $rc -ne 0 ] && grep -q "OutOfMemoryError\|CUDA out of memory" "$OUT/train-mb$mb.log"; then
      log "train: out of memory at micro-batch $mb; halving"; mb=$(( mb / 2 )); continue
    fi
    break
  done
  local run_dir=$WORK/runs/pretrain/$name
  mkdir -p "$OUT/train"
  cp "$run_dir"/{config.yaml,metrics.json} "$run_dir"/logs/metrics.csv "$run_dir"/tokenizer/speech_layout.json \
     "$OUT/train/" 2>/dev/null
  [ -f "$OUT/train_timing_mb$mb.json" ] && cp "$OUT/train_timing_mb$mb.json" "$OUT/train/timing.json"
  local data="random codes (uniform over 65,536; seed 0) at 50 codes/s over the quickstart corpus' 1,497 train"
  data+=" utterances (their transcripts, speakers, durations; 347k codes), via scripts/bench_train.py shards;"
  data+=" text source + BPE: 20,000 lines of random words (tokenizer.vocab_size=128254 -> 193,799 -> 193,856 rows)"
  "$PY" scripts/bench_train.py summarize --run "$run_dir" --timing "$OUT/train/timing.json" \
      --command-line "python train.py ${cmd[*]}  (via scripts/bench_train.py run --no-save: + a step timer)" \
      --data "$data" --out "$OUT/train_bench.json" > "$OUT/train_summary.log" 2>&1
  cat "$OUT/train_bench.md" 2>/dev/null | sed 's/^/    /'
  return $rc
}

step_export() {  # $1: dtype
  local dtype=$1 tag; tag=$([ "$1" = bfloat16 ] && echo bf16 || echo f32)
  local art=$WORK/artifacts/quickstart-$DEVICE-$tag
  rm -rf "$art"
  # Cold, the export's graphs took more than 300 s to compile on an H200 (2026-11-28: neither export finished
  # in its 300 s; export.py now logs each graph's compile time), hence 540 s.
  run "export-$tag" 540 "$PY" export.py experiment=quickstart speechlm=$DATA/runs/rlhf/quickstart \
      codec=$DATA/runs/codec/quickstart device=$DEVICE dtype=$dtype out="$art" \
      data.path=$DATA/corpus-quickstart-parity paths.runs_dir="$WORK/runs" parity.report="$OUT/parity-$tag"
  local rc=$?
  mkdir -p "$OUT/export-$tag"
  if [ -d "$art" ]; then
    cp "$art"/{manifest.json,parity.json,parity.md} "$OUT/export-$tag/" 2>/dev/null
    (cd "$art" && find . -type f | sort | xargs ls -la) > "$OUT/export-$tag/files.txt" 2>&1
  else
    echo "no artifact at $art (rc=$rc)" > "$OUT/export-$tag/files.txt"
  fi
  cat "$OUT/parity-$tag/parity.md" 2>/dev/null | sed 's/^/    /'
  return $rc
}

step_emulate() {  # what configs/export.yaml's gpu/float32 thresholds were set from, beside export-f32
  run emulate-f32 120 "$PY" scripts/emulate_gpu_float32.py experiment=quickstart \
      sources.speechlm=$DATA/runs/rlhf/quickstart sources.codec=$DATA/runs/codec/quickstart \
      data.path=$DATA/corpus-quickstart-parity paths.runs_dir="$WORK/runs" parity.report="$OUT/emulated-f32"
}

step_ops() {
  run ops 300 "$PY" scripts/check_max_ops.py --device "$DEVICE" --out "$OUT/ops.json"
  cat "$OUT/ops.md" 2>/dev/null | sed 's/^/    /'
}

step_bench() {
  local repeats=30 preset=base
  [ "$DEVICE" = cpu ] && repeats=3 preset=tiny
  run bench-quickstart 150 "$PY" scripts/bench_export.py --speechlm $DATA/runs/rlhf/quickstart \
      --codec $DATA/runs/codec/quickstart --device "$DEVICE" --dtype "$DTYPE" --repeats $repeats \
      --out "$OUT/bench_export_quickstart.json"
  run bench-base 240 "$PY" scripts/bench_export.py --speechlm-preset $preset --codec none \
      --device "$DEVICE" --dtype "$DTYPE" --repeats $repeats --out "$OUT/bench_export_base.json"
}

for step in "${STEPS[@]}"; do
  case $step in
    env) step_env ;;
    ops) step_ops ;;
    train) step_train ;;
    export) step_export "$DTYPE" ;;
    export-f32) step_export float32; step_emulate ;;
    emulate) step_emulate ;;
    bench) step_bench ;;
    *) log "unknown step $step" ;;
  esac
done
{
  echo "# device checks ($DEVICE), $(date -u +%FT%TZ)"; echo
  grep -E "^(python|torch|transformers|max |cuda|max accelerator)|MISSING|FAILED" "$OUT/env.txt" 2>/dev/null
  echo "MAX graphs in the cache: $MEFS_BEFORE before, $(mef_count) after (more after = compiled here)"
  echo '```'; cat "$OUT/steps.tsv"; echo '```'
  for f in ops.md train_bench.md parity-bf16/parity.md parity-f32/parity.md; do
    [ -f "$OUT/$f" ] && { echo; cat "$OUT/$f"; }
  done
  for f in bench-quickstart bench-base; do
    [ -f "$OUT/$f.log" ] && { echo; echo "## $f"; grep -E '^(machine|\|)' "$OUT/$f.log"; }
  done
} > "$OUT/summary.md"
log "done; summary:"
cat "$OUT/summary.md"

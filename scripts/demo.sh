#!/usr/bin/env bash
# `make demo`: the whole pipeline at one scale (quickstart by default) on this machine's CPUs.
# Every step resumes or skips what a previous demo run already finished (same run names, same corpus).
set -euo pipefail
cd "$(dirname "$0")/.."
EXPERIMENT=${1:-quickstart}
PY=.venv/bin/python
step() { printf '\n=== %s (%s)\n' "$*" "$(date +%H:%M:%S)"; }

step "corpus: corpus=$EXPERIMENT"
$PY scripts/build_corpus.py corpus="$EXPERIMENT"

for stage in codec tokenize; do
  step "python train.py stage=$stage experiment=$EXPERIMENT"
  $PY train.py stage=$stage experiment="$EXPERIMENT"
done

step "codec evaluation -> runs/codec/$EXPERIMENT/eval/"
$PY scripts/eval_codec.py experiment="$EXPERIMENT"

for stage in pretrain sft; do
  step "python train.py stage=$stage experiment=$EXPERIMENT"
  $PY train.py stage=$stage experiment="$EXPERIMENT"
done

step "TTS evaluation -> runs/sft/$EXPERIMENT/eval/"
$PY scripts/eval_tts.py experiment="$EXPERIMENT"

step "python train.py stage=rlhf experiment=$EXPERIMENT (the experiment's algorithm; then SFT vs aligned -> runs/rlhf/$EXPERIMENT/eval/)"
$PY train.py stage=rlhf experiment="$EXPERIMENT"

step "voices: one per train speaker -> voices/ (synth.py voice=<name>, the artifact, the server)"
$PY scripts/make_voices.py experiment="$EXPERIMENT"

step "python export.py experiment=$EXPERIMENT -> artifacts/$EXPERIMENT (MAX graphs behind the parity gate)"
$PY export.py experiment="$EXPERIMENT" speechlm="runs/rlhf/$EXPERIMENT" out="artifacts/$EXPERIMENT"

step "a sample: runs/rlhf/$EXPERIMENT/demo.wav"
$PY synth.py text="The quick brown fox jumps over the lazy dog." \
  speechlm="runs/rlhf/$EXPERIMENT/hf" codec="runs/codec/$EXPERIMENT" out="runs/rlhf/$EXPERIMENT/demo.wav"

step "done: runs/<stage>/$EXPERIMENT/ holds each stage's run folder; docs/benchmarks.md explains the numbers"
cat <<EOF
Serve it (streaming, OpenAI-compatible; a web page at http://127.0.0.1:8000/):
  $PY serve.py artifact=artifacts/$EXPERIMENT                      # MAX
  $PY serve.py backend=torch checkpoint=runs/rlhf/$EXPERIMENT codec=runs/codec/$EXPERIMENT   # PyTorch
EOF

#!/usr/bin/env bash
# `make demo`: the whole pipeline at one scale (quickstart by default) on this machine's CPUs.
# Every step resumes or skips what a previous demo run already finished.
set -euo pipefail
cd "$(dirname "$0")/.."
EXPERIMENT=${1:-quickstart}
PY=.venv/bin/python
step() { printf '\n=== %s\n' "$*"; }

step "corpus ($EXPERIMENT)"
$PY scripts/build_corpus.py corpus="$EXPERIMENT"

for stage in codec tokenize; do
  step "stage=$stage"
  $PY train.py stage=$stage experiment="$EXPERIMENT"
done

step "codec evaluation"
$PY scripts/eval_codec.py experiment="$EXPERIMENT"

step "done: runs/ holds every stage's run folder; docs/benchmarks.md explains the numbers"

"""Build the offline multi-speaker English corpus (flite, festival, espeak-ng reading fortunes and the KJV):

    python scripts/build_corpus.py                                  # the quickstart preset
    python scripts/build_corpus.py corpus=tiny out=/tmp/corpus      # a few utterances per engine
    python scripts/build_corpus.py hours=0.5 workers=2 seed=7 out=data/corpus

A thin command line over voxlm.data.corpus.build_corpus; presets live in configs/corpus/, shared defaults in
configs/build_corpus.yaml. Writes a DatasetDict (datasets.load_from_disk) and summary.json at `out`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from voxlm.data.corpus import build_corpus, format_summary


@hydra.main(version_base="1.3", config_path="../configs", config_name="build_corpus")
def main(cfg: DictConfig) -> None:
    summary = build_corpus(cfg)
    print(format_summary(summary))
    print(f"corpus: {cfg.out} (load it with datasets.load_from_disk; summary in summary.json)")


if __name__ == "__main__":
    main()

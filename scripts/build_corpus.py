"""Build the offline multi-speaker corpus:

    python scripts/build_corpus.py [corpus=tiny|quickstart] [hours=0.5] [out=DIR]


A thin command line over voxlm.data.corpus; presets live in configs/corpus/.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from voxlm.data.corpus import build_corpus, format_summary


@hydra.main(version_base="1.3", config_path="../configs", config_name="build_corpus")
def main(cfg: DictConfig) -> None:
    summary = build_corpus(cfg)
    print(format_summary(summary))
    print(f"corpus: {cfg.out} (load it with datasets.load_from_disk)")


if __name__ == "__main__":
    main()

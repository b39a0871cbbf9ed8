"""Evaluate a trained SpeechLM: `python scripts/eval_tts.py [experiment=quickstart] [eval.speechlm_run=DIR]`.

A thin command line over voxlm.eval.tts_eval; see configs/eval_tts.yaml for the options.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from voxlm.eval.tts_eval import Judges, evaluate_tts


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval_tts")
def main(cfg: DictConfig) -> None:
    evaluate_tts(cfg.eval, cfg.data, Judges.load(cfg.judges))


if __name__ == "__main__":
    main()

"""Evaluate a trained codec: `python scripts/eval_codec.py [experiment=quickstart] [eval.codec_run=DIR]`.

A thin command line over voxlm.eval.codec_eval; see configs/eval_codec.yaml for the options.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from voxlm.eval.asr import WhisperJudge
from voxlm.eval.codec_eval import evaluate_codec


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval_codec")
def main(cfg: DictConfig) -> None:
    evaluate_codec(
        codec_dir=Path(cfg.eval.codec_run), data_cfg=cfg.data, out_dir=Path(cfg.eval.out),
        splits=list(cfg.eval.splits), limit=int(cfg.eval.max_utterances),
        chunk_frames=list(cfg.eval.stream_chunk_frames), judge=WhisperJudge.from_config(cfg.judges.asr),
        include_librivox=bool(cfg.eval.librivox),
    )


if __name__ == "__main__":
    main()

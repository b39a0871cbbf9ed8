"""How much of a TTS evaluation's WER is Whisper looping? `python scripts/loop_guard.py EVAL [EVAL ...]`.

EVAL is an eval_tts output (its folder or tts_eval.json). For each condition and each thing heard (the
synthesis, the ground-truth recordings, the recordings through the codec): how many transcripts are
Whisper repetition loops (voxlm.eval.asr.is_repetition_loop), the corpus WER as judged, and the WER with
each loop counted as heard nothing (every word missed). Reads the stored transcripts; runs no model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from voxlm.eval.asr import corpus_wer, is_repetition_loop

HEARD = {"heard": "synthesis", "heard_ground_truth": "ground truth",
         "heard_codec_resynth": "through the codec"}


def loop_rows(report: dict) -> list[tuple[str, str, int, float, float]]:
    """(condition, what was heard, loops, WER as judged, WER with loops as empty) for one tts_eval.json."""
    rows = []
    for condition, records in report["records"].items():
        references = [record["text"] for record in records]
        for key, name in HEARD.items():
            if not records or key not in records[0]:
                continue
            heard = [record[key] for record in records]
            loops = [is_repetition_loop(text) for text in heard]
            guarded = ["" if loop else text for text, loop in zip(heard, loops, strict=True)]
            rows.append((condition, name, sum(loops), corpus_wer(references, heard),
                         corpus_wer(references, guarded)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evals", nargs="+", type=Path, help="eval_tts output folders or tts_eval.json files")
    args = parser.parse_args()
    print("| eval | condition | heard | n loops | WER as judged | WER, loops as heard nothing |")
    print("|---|---|---|---:|---:|---:|")
    for path in args.evals:
        report_path = path / "tts_eval.json" if path.is_dir() else path
        if not report_path.is_file():
            raise SystemExit(f"{report_path} not found: pass an eval_tts output folder or its tts_eval.json")
        for condition, name, loops, wer, guarded in loop_rows(json.loads(report_path.read_text())):
            print(f"| {path} | {condition} | {name} | {loops} | {wer:.3f} | {guarded:.3f} |")


if __name__ == "__main__":
    main()

"""Would reranking samples help? `python scripts/best_of_n.py experiment=quickstart eval.speechlm_run=RUN
[eval.max_utterances=40] [eval.candidates=4] ['~eval.conditions.test_unseen']`.

Tortoise-style synthesis samples several candidates per sentence and keeps the one a scorer prefers. This
script measures what that could buy a SpeechLM before anyone builds it: each sentence of each condition (as
eval_tts picks them, with its voice prompt) is spoken `eval.candidates` times (sampling seeds seed, seed + 1,
...), every candidate is transcribed by the Whisper judge and read by the codec's CTC head, and for each
N = 1, 2, 4, ... the candidates are split into groups of N and one is kept per sentence by:

- first: the first sample of the group (what eval_tts scores: no reranking);
- readability: the lowest character error of what the codec's CTC head reads off the codes (a scorer the
  synthesizer itself has; it needs no audio);
- oracle: the lowest WER by the judge itself, an upper bound on what any reranker could reach.

Corpus WER (and the same with Whisper's repetition loops counted as heard nothing) and speaker similarity
of the kept candidates, averaged over the groups, go to best_of_n.md and .json in eval.out, with the mean
within-sentence correlation of the candidates' character error and WER (does the CTC head rank candidates
as Whisper hears them?).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from voxlm.codec.align import character_error, require_ctc_head
from voxlm.codec.module import load_codec
from voxlm.data.text import normalize_text
from voxlm.eval.asr import WhisperJudge, utterance_wers
from voxlm.eval.best_of_n import kept_rows
from voxlm.eval.report import markdown_table, write_json
from voxlm.eval.speaker import SpeakerJudge
from voxlm.eval.tts_eval import build_cases, speaker_similarities, synthesize_cases
from voxlm.speechlm.generate import SamplingConfig
from voxlm.speechlm.model import load_speechlm

log = logging.getLogger("best_of_n")


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval_tts")
def main(cfg: DictConfig) -> None:
    ev = cfg.eval
    codec = load_codec(ev.codec_run).eval()
    head = require_ctc_head(ev.codec_run, "the readability rule reads the codes with it")
    model, tok = load_speechlm(ev.speechlm_run, codec.codebook_size, codec_id=codec.code_fingerprint())
    asr, speaker = WhisperJudge.from_config(cfg.judges.asr), SpeakerJudge()
    sampling = OmegaConf.to_container(ev.sampling)
    report: dict[str, Any] = {"speechlm_run": str(ev.speechlm_run), "candidates": int(ev.candidates),
                              "sampling": sampling, "conditions": {}}
    table = {}
    for name, condition in ev.conditions.items():
        cases = build_cases(cfg.data, condition.split, condition.reference_split, codec.sample_rate,
                            int(ev.max_utterances), float(ev.max_prompt_seconds), int(ev.seed))
        texts = [case.text for case in cases]
        heard, wer, error, sim = [], [], [], []
        for k in range(int(ev.candidates)):
            seeded = SamplingConfig(**{**sampling, "seed": int(sampling["seed"]) + k})
            outputs = synthesize_cases(model, tok, codec, cases, seeded, ev.length, int(ev.batch_size))
            audios = [output["audio"] for output in outputs]
            heard.append(asr.transcribe(audios, codec.sample_rate))
            wer.append(utterance_wers(texts, heard[-1]))
            error.append([character_error(head, codec.quantizer, output["codes"], normalize_text(text))
                          if len(output["codes"]) else 1.0
                          for output, text in zip(outputs, texts, strict=True)])
            sim.append(speaker_similarities(speaker, audios, [case.reference_audio for case in cases],
                                            codec.sample_rate))
            log.info("%s: candidate %d of %d", name, k + 1, ev.candidates)
        heard_arr, wer_arr, error_arr, sim_arr = (np.array(heard, dtype=object), np.array(wer),
                                                  np.array(error), np.array(sim))
        rows: dict[str, dict[str, float]] = {}
        group_size = 1
        while group_size <= len(heard):
            rows.update(kept_rows(texts, heard_arr, wer_arr, error_arr, sim_arr, group_size))
            group_size *= 2
        # A sentence whose candidates all score alike (or whose text has no words to score) says nothing.
        correlations = [np.corrcoef(error_arr[:, i], wer_arr[:, i])[0, 1] for i in range(len(texts))
                        if not np.isnan(wer_arr[:, i]).any() and error_arr[:, i].std() > 0
                        and wer_arr[:, i].std() > 0]
        report["conditions"][name] = {
            "n": len(texts), "rows": rows,
            "error_wer_correlation": float(np.mean(correlations)) if correlations else None,
            "sentences_correlated": len(correlations),
            "candidates": {"heard": heard, "wer": wer, "char_error": error, "speaker_sim": sim_arr.tolist()},
        }
        table.update({f"{name}: {row}": values for row, values in rows.items()})
        log.info("%s: within-sentence correlation of character error and WER %.3f over %d sentences", name,
                 report["conditions"][name]["error_wer_correlation"] or float("nan"), len(correlations))
    out = Path(ev.out)
    write_json(report, out / "best_of_n.json")
    correlation_lines = [
        f"- {name}: {c['n']} sentences; mean within-sentence correlation of the candidates' character error "
        f"and WER: {c['error_wer_correlation']:.3f} ({c['sentences_correlated']} sentences whose candidates "
        "differ)" for name, c in report["conditions"].items() if c["error_wer_correlation"] is not None]
    last_seed = int(sampling["seed"]) + int(ev.candidates) - 1
    (out / "best_of_n.md").write_text("\n".join([
        f"# Best of N: {ev.speechlm_run}", "",
        f"{ev.candidates} candidates per sentence (seeds {sampling['seed']}...{last_seed}); Whisper beam "
        f"{asr.beam_size}. Rows: the candidate kept per sentence by each rule, averaged over disjoint groups "
        "of N.", "",
        markdown_table(table, ["groups", "wer", "wer_loops_as_silence", "speaker_sim", "char_error"],
                       row_label="kept"), "", *correlation_lines, ""]))
    log.info("written to %s", out / "best_of_n.md")


if __name__ == "__main__":
    main()

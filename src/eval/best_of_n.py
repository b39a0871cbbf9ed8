"""Best of N: which of several sampled candidates per sentence a reranking rule keeps, and how they score.

scripts/best_of_n.py samples the candidates and judges them; this module keeps one per sentence by each rule
(the first sample, the codec CTC head's lowest character error, or the judge's own lowest WER as an upper
bound) and scores what was kept.
"""

from __future__ import annotations

import numpy as np

from voxlm.eval.asr import corpus_wer, is_repetition_loop


def kept_rows(texts: list[str], heard: np.ndarray, wer: np.ndarray, error: np.ndarray, sim: np.ndarray,
              group_size: int) -> dict[str, dict[str, float]]:
    """Per rule, the scores of the candidates it keeps, averaged over the disjoint groups of `group_size`
    candidates. Every array is [candidates, sentences]: transcripts, utterance WERs (NaN: nothing to score),
    character errors and speaker similarities. Rows: corpus WER, the same with repetition loops heard as
    nothing, mean similarity and character error of the kept candidates."""
    # Each rule picks, per sentence, a position within the group's candidates.
    rules = {"first": lambda group: np.zeros(len(texts), dtype=int),
             "readability": lambda group: error[group].argmin(axis=0),
             "oracle": lambda group: np.nan_to_num(wer[group], nan=np.inf).argmin(axis=0)}
    if group_size == 1:  # one candidate: every rule keeps it
        rules = {"first": rules["first"]}
    sentences = np.arange(len(texts))
    rows = {}
    for name, rule in rules.items():
        scores = []
        for start in range(0, len(heard) - group_size + 1, group_size):
            group = np.arange(start, start + group_size)
            kept = group[rule(group)]
            hypotheses = [str(heard[k, i]) for i, k in enumerate(kept)]
            scores.append((corpus_wer(texts, hypotheses),
                           corpus_wer(texts, ["" if is_repetition_loop(h) else h for h in hypotheses]),
                           sim[kept, sentences].mean(), error[kept, sentences].mean()))
        wer_mean, guarded, similarity, char_error = np.mean(scores, axis=0)
        rows[f"best of {group_size}, {name}"] = {"groups": len(scores), "wer": wer_mean,
                                                 "wer_loops_as_silence": guarded, "speaker_sim": similarity,
                                                 "char_error": char_error}
    return rows

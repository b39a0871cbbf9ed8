"""Durations or sounds? `python scripts/given_timing.py experiment=quickstart eval.speechlm_run=RUN
[eval.max_utterances=30] ['~eval.conditions.test_unseen']` for an interleaved SpeechLM.

For each evaluation sentence (the first `eval.max_utterances` of each condition, with eval_tts's voice
prompts and sampling): the ground-truth recording's codes, the model speaking freely, the model speaking
with the recording's character timings, the model predicting each of the recording's codes from the
recording's own history (teacher forced; voxlm.eval.given_timing), and the same with the sentence's spoken
characters shuffled (its control: at 100 codes/s the history alone predicts much of each code, so only the
difference between the two says how much of the teacher-forced speech comes from the text). With
`eval.mix_shares=[0.1,0.2,...]`, one more row per share: the recording's codes with that share of frames
replaced by the teacher-forced picks (voxlm.eval.given_timing.mix_codes), which says how many of the model's
picks the speech tolerates. Each is decoded by the codec and transcribed by Whisper tiny.en; the codec's CTC
head also reads characters off the codes (a character error rate that needs no audio), and `code_match` is
the share of frames whose code is the recording's (every row but the free one). Writes given_timing.md
and .json to eval.out.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from voxlm.codec.align import character_error, require_ctc_head, transcript_timings
from voxlm.codec.module import load_codec
from voxlm.data.text import normalize_text
from voxlm.eval.asr import WhisperJudge, corpus_wer
from voxlm.eval.given_timing import check_share, codes_at_timings, codes_teacher_forced, mix_codes
from voxlm.eval.report import markdown_table, write_json
from voxlm.eval.tts_eval import build_cases, case_prompt, decode_codes, encode_audio
from voxlm.speechlm.generate import SamplingConfig, frame_limit, generate_codes
from voxlm.speechlm.model import load_speechlm
from voxlm.speechlm.voices import decoding_voice

log = logging.getLogger("given_timing")
WAYS = ("ground_truth", "free", "given_timing", "teacher_forced", "teacher_forced_shuffled")


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval_tts")
def main(cfg: DictConfig) -> None:
    ev = cfg.eval
    mix_shares = [check_share(share) for share in ev.mix_shares]  # before minutes of synthesis, not after
    codec = load_codec(ev.codec_run).eval()
    head = require_ctc_head(ev.codec_run, "the timings come from its forced alignment")
    model, tok = load_speechlm(ev.speechlm_run, codec.codebook_size, codec_id=codec.code_fingerprint())
    sampling = SamplingConfig(**OmegaConf.to_container(ev.sampling))
    generator = torch.Generator().manual_seed(int(ev.sampling.seed)) if not sampling.greedy else None
    judge = WhisperJudge.from_config(cfg.judges.asr)
    shuffle = np.random.default_rng(int(ev.seed))
    mixing = np.random.default_rng(int(ev.seed) + 1)  # its own draws: the shuffles stay as without mixing
    ways = [*WAYS, *(f"teacher_forced_mixed_{share:g}" for share in mix_shares)]
    rate, table, report = codec.frame_rate, {}, {"speechlm_run": str(ev.speechlm_run), "conditions": {}}
    for name, condition in ev.conditions.items():
        cases = build_cases(cfg.data, condition.split, condition.reference_split, codec.sample_rate,
                            int(ev.max_utterances), float(ev.max_prompt_seconds), int(ev.seed))
        texts, results = [], {way: {"hypotheses": [], "cer": [], "duration": [], "match": []} for way in ways}
        for case in tqdm(cases, desc=name, unit="sentence"):
            text = normalize_text(case.text)
            truth = encode_audio(codec, case.audio)
            _, letter_starts = transcript_timings(head, codec.quantizer, truth, text)
            starts = tok.spoken_timings(text, letter_starts, len(truth))
            if starts is None:
                log.warning("%s: the CTC head cannot align '%s' to its recording; left out", case.id, text)
                continue
            prompt, chars = case_prompt(tok, codec, case), tok.spoken_char_ids(text)
            shuffled = [int(c) for c in shuffle.permutation(chars)]
            limit = frame_limit(len(tok.encode_text(text)), ev.length.base_seconds * rate,
                                ev.length.seconds_per_text_token * rate)
            codes = {"ground_truth": torch.from_numpy(truth),
                     "free": generate_codes(model, tok, [prompt], limit, sampling, spoken=[chars]).codes[0],
                     "given_timing": codes_at_timings(model, tok, prompt, chars, starts, len(truth), sampling,
                                                      generator),
                     "teacher_forced": codes_teacher_forced(model, tok, prompt, chars, starts, truth,
                                                            sampling, generator),
                     "teacher_forced_shuffled": codes_teacher_forced(model, tok, prompt, shuffled, starts,
                                                                     truth, sampling, generator)}
            draws = mixing.random(len(truth))
            for share in mix_shares:
                codes[f"teacher_forced_mixed_{share:g}"] = torch.from_numpy(
                    mix_codes(truth, codes["teacher_forced"].numpy(), share, draws))
            texts.append(case.text)
            voice = decoding_voice(codec, case.reference_audio)  # one voice for every way of saying it
            for way, said in codes.items():
                audio = decode_codes(codec, said, voice)
                results[way]["hypotheses"].append(judge.transcribe_one(audio, codec.sample_rate))
                results[way]["cer"].append(character_error(head, codec.quantizer, said.numpy(), text))
                results[way]["duration"].append(len(said) / len(truth))
                if way != "free":  # every other way says exactly the recording's frames
                    results[way]["match"].append(float((said.numpy() == truth).mean()))
        rows = {f"{name}/{way}": {"n": len(texts), "wer": corpus_wer(texts, r["hypotheses"]),
                                  "ctc_cer": float(np.mean(r["cer"])),
                                  "duration_ratio": float(np.mean(r["duration"])),
                                  **({"code_match": float(np.mean(r["match"]))} if r["match"] else {})}
                for way, r in results.items()}
        table |= rows
        report["conditions"][name] = {"rows": rows, "texts": texts, "results": results}
    out = Path(ev.out)
    write_json(report | {"sampling": OmegaConf.to_container(ev.sampling)}, out / "given_timing.json")
    lines = [f"# Given timings: {ev.speechlm_run}", "", f"Sampling {OmegaConf.to_container(ev.sampling)}.",
             "", markdown_table(table, ["n", "wer", "ctc_cer", "code_match", "duration_ratio"]), ""]
    (out / "given_timing.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

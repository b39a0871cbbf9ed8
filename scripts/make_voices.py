"""Save one voice per speaker of a corpus split: `python scripts/make_voices.py [experiment=quickstart]`.

Each voice is a recording of the speaker (the first of the split between voices.min_seconds and max_seconds,
preprocessed as training data) and its transcript, encoded by the codec: what synth.py voice=<name>, the
artifact (export.py ships voices/) and serve.py's "voice" field take. Options: configs/make_voices.yaml.
"""

from __future__ import annotations

from collections import Counter

import hydra
from omegaconf import DictConfig

from voxlm.codec.module import load_codec
from voxlm.data.dataset import build_dataset
from voxlm.speechlm.voices import save_voice, voice_from_audio


def make_voices(cfg: DictConfig, data_cfg: DictConfig) -> list[str]:
    codec = load_codec(cfg.codec_run).eval()
    dataset = build_dataset(data_cfg, cfg.split, sample_rate=codec.sample_rate)
    saved: Counter[str] = Counter()
    names = []
    for i, (speaker, duration) in enumerate(zip(dataset.speakers, dataset.durations, strict=True)):
        if saved[speaker] >= cfg.per_speaker or not cfg.min_seconds <= duration <= cfg.max_seconds:
            continue
        item = dataset[i]
        if item is None:  # unreadable audio: skipped and counted by the dataset
            continue
        name = speaker if cfg.per_speaker == 1 else f"{speaker}-{saved[speaker]}"
        voice = voice_from_audio(codec, item.audio, item.text, name, speaker)
        folder = save_voice(voice, cfg.out, item.audio)
        saved[speaker] += 1
        names.append(name)
        print(f"saved voice '{name}' ({voice.duration:.2f} s): {folder}")
    if not names:
        raise SystemExit(f"no {cfg.split} recording lasts {cfg.min_seconds}-{cfg.max_seconds} s: widen "
                         "voices.min_seconds / voices.max_seconds")
    return names


@hydra.main(version_base="1.3", config_path="../configs", config_name="make_voices")
def main(cfg: DictConfig) -> None:
    make_voices(cfg.voices, cfg.data)


if __name__ == "__main__":
    main()

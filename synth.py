"""Speak a text with a trained SpeechLM and codec:

    python synth.py text="Hello there." voice=ref.wav voice_text="transcript of ref.wav" out=out.wav
    python synth.py text="Hello again." voice=<saved voice name> stream=true
    [speechlm=runs/sft/latest/hf] [codec=runs/codec/latest] [save_voice=<name>] [sampling.seed=1] ...

The text is normalized, put after the voice prompt's transcript in the tts format (tts_prompt), and the
SpeechLM samples codes after the voice prompt's codes until it says [speech_end] or reaches the length guard.
stream=true decodes each chunk of codes while the next is sampled (Codec.stream); stream=false decodes them
all at the end. Both give the same audio for the same codes. Options: configs/synth.yaml.

Free-text values (text=, voice_text=) are quoted for Hydra here, so commas, colons and brackets in a
sentence need no Hydra escaping; a value the shell already passes with quotes is left as it is.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra import compose, initialize
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from voxlm.codec.model import Codec
from voxlm.codec.module import load_codec
from voxlm.data.audio import save_audio
from voxlm.data.dataset import Preprocess
from voxlm.data.text import normalize_text
from voxlm.speechlm.generate import SamplingConfig, frame_limit, generate_codes, stream_codes
from voxlm.speechlm.model import load_speechlm, speechlm_codec
from voxlm.speechlm.sequences import tts_prompt
from voxlm.speechlm.voices import (
    Voice,
    decoding_voice,
    encode_voice,
    load_reference_audio,
    load_voice,
    save_voice,
    voice_for_codec,
)

CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "synth.yaml"
FREE_TEXT_KEYS = ("text", "voice_text")

log = logging.getLogger("synth")

# Stored under a name rather than read from configs/ as a config path: Hydra would then take `codec=...` and
# `speechlm=...` for the config groups of the same names (configs/codec/, configs/speechlm/) of train.py.
ConfigStore.instance().store(name="synth", node=OmegaConf.load(CONFIG_FILE))


class SynthError(Exception):
    """A problem with what was asked for (missing checkpoint, voice, text), reported without a traceback."""


@dataclass
class Synthesis:
    audio: np.ndarray       # float32 [samples]
    sample_rate: int
    codes: torch.Tensor     # LongTensor [frames] that the audio decodes
    truncated: bool         # the length guard cut it off before [speech_end]
    max_frames: int
    seconds: float          # wall time from the prompt's prefill to the last audio sample
    first_audio_seconds: float | None  # streaming: wall time until the first chunk of audio

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


def quote_free_text(args: list[str]) -> list[str]:
    """Wrap text=/voice_text= values in Hydra single quotes (escaping quotes, interpolations and the
    backslashes before them), unless the value is quoted already."""
    quoted = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in FREE_TEXT_KEYS and not (len(value) >= 2 and value[0] == value[-1] in "'\""):
            value = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
            value = value.replace("${", "\\${")
            arg = f"{key}='{value}'"
        quoted.append(arg)
    return quoted


def compose_config(overrides: list[str]) -> DictConfig:
    """configs/synth.yaml with command-line style overrides (for scripts and tests)."""
    with initialize(version_base="1.3", config_path=None):
        return compose("synth", overrides=quote_free_text(overrides))


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_voice(cfg: DictConfig, codec: Codec) -> tuple[Voice | None, np.ndarray | None]:
    """The voice prompt: none, a saved voice (name or folder), or one encoded now from a recording; with
    the recording it was encoded from (None when a saved voice kept none)."""
    if cfg.voice is None:
        if cfg.voice_text:
            raise SynthError("voice_text is a reference recording's transcript: pass voice=path/to/ref.wav")
        return None, None
    path = Path(str(cfg.voice))
    if not path.is_file():
        if cfg.voice_text:
            log.warning("voice_text is ignored: the saved voice '%s' has its own transcript", cfg.voice)
        reference_audio = load_reference_audio(path, cfg.voices_dir, codec.sample_rate)
        return voice_for_codec(load_voice(path, cfg.voices_dir), codec, reference_audio), reference_audio
    transcript = normalize_text(cfg.voice_text or "")
    if not transcript:
        raise SynthError(f"voice={path} is a recording: pass voice_text=\"what it says\" as well")
    preprocess = Preprocess(**OmegaConf.to_container(cfg.voice_preprocess))
    voice, audio = encode_voice(codec, path, transcript, cfg.save_voice or path.stem, cfg.speaker, preprocess)
    if cfg.save_voice:
        folder = save_voice(voice, cfg.voices_dir, audio)
        print(f"saved voice '{voice.name}' ({voice.duration:.2f} s) to {folder}")
    return voice, audio


@torch.no_grad()
def synthesize(cfg: DictConfig) -> Synthesis:
    """Everything but writing the file: load, build the prompt, sample codes, decode."""
    text = normalize_text(cfg.text or "")
    if not text:
        raise SynthError("text is empty: pass text=\"what to say\"")
    device = resolve_device(cfg.device)
    codec = load_codec(speechlm_codec(cfg.speechlm, cfg.codec, "runs/codec/latest"), map_location=device)
    voice, reference_audio = resolve_voice(cfg, codec)
    decode_voice = decoding_voice(codec, reference_audio)
    model, tok = load_speechlm(cfg.speechlm, codec.codebook_size, device, cfg.dtype,
                               codec_id=codec.code_fingerprint())

    prompt = tts_prompt(tok, text, voice.text if voice else None, voice.codes if voice else None)
    spoken = [tok.spoken_char_ids(text)] if tok.interleaved else None
    if spoken is not None and not spoken[0]:
        raise SynthError(f"text {text!r} has no character this model speaks "
                         f"({tok.layout.spoken_alphabet!r}): spell numbers and symbols out in words")
    # The guard counts the target text's tokens only: the voice prompt's speech is given, not generated.
    rate = codec.frame_rate
    max_frames = frame_limit(len(tok.encode_text(text)), cfg.length.base_seconds * rate,
                             cfg.length.seconds_per_text_token * rate)
    sampling = SamplingConfig(**OmegaConf.to_container(cfg.sampling))
    log.info("prompt: %d tokens (voice: %s), at most %d codes", len(prompt),
             f"'{voice.name}', {voice.duration:.2f} s" if voice else "none", max_frames)

    start = time.perf_counter()
    if cfg.stream:
        codes, truncated, audio, first_audio = stream_decode(
            codec, stream_codes(model, tok, [prompt], max_frames, sampling, list(cfg.stream_chunk_frames),
                                spoken=spoken), device, start, decode_voice)
    else:
        generation = generate_codes(model, tok, [prompt], max_frames, sampling, spoken=spoken)
        codes, truncated, first_audio = generation.codes[0], generation.truncated[0], None
        audio = codec.decode(codes[None].to(device), decode_voice)[0] if len(codes) else torch.zeros(0)
    seconds = time.perf_counter() - start
    return Synthesis(audio.float().cpu().numpy(), codec.sample_rate, codes.cpu(), truncated, max_frames,
                     seconds, first_audio)


def stream_decode(codec: Codec, chunks, device: str, start: float, voice: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, bool, torch.Tensor, float | None]:
    """Decode one row's code chunks as they come (in `voice`, for a codec with a voice encoder): (codes,
    truncated, audio, seconds to first audio)."""
    state, codes, pieces, truncated, first_audio = codec.init_stream(1, voice), [], [], False, None
    for chunk in chunks:
        audio, state = codec.stream(chunk.codes[0][None].to(device), state)
        if first_audio is None and audio.shape[1]:
            first_audio = time.perf_counter() - start
        codes.append(chunk.codes[0])
        pieces.append(audio)
        truncated = chunk.truncated[0]
    pieces.append(codec.flush(state))
    return torch.cat(codes), truncated, torch.cat(pieces, dim=1)[0], first_audio


def summary(result: Synthesis, out: Path, stream: bool) -> str:
    """What the command prints: duration, real-time factor, and whether the length guard cut it."""
    rtf = result.seconds / result.duration if result.duration else float("inf")
    timing = f"{result.seconds:.2f} s to synthesize"
    if stream and result.first_audio_seconds is not None:
        timing += f", first audio after {result.first_audio_seconds:.3f} s"
    lines = [f"wrote {out}: {result.duration:.2f} s of audio ({len(result.codes)} codes, "
             f"{result.sample_rate} Hz)", f"real-time factor {rtf:.3f} ({timing})"]
    if result.truncated:
        lines.append(f"length guard: cut off at {result.max_frames} codes (the model never said "
                     "<|speech_end|>)")
    else:
        lines.append(f"length guard: not reached (stopped at <|speech_end|>, limit {result.max_frames})")
    if not len(result.codes):
        lines.append("warning: the model said <|speech_end|> at once; the file is empty")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=None, config_name="synth")
def main(cfg: DictConfig) -> None:
    try:
        result = synthesize(cfg)
    except (SynthError, FileNotFoundError, ValueError) as error:
        print(f"synth.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    out = save_audio(cfg.out, result.audio, result.sample_rate)
    print(summary(result, out, bool(cfg.stream)))


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *quote_free_text(sys.argv[1:])]
    main()

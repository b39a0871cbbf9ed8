"""`python export.py`: trained checkpoints -> a MAX artifact, admitted only by the parity gate.

    1. load the SpeechLM (latest RLHF or SFT run) and the codec (latest codec run) in PyTorch;
    2. build their MAX graphs from the same weights (nothing retrained, nothing downloaded), compiling each
       graph once into the artifact's graphs/ folder (voxlm.export.sessions);
    3. run the parity gate (voxlm.export.parity) on real prompts and recordings from the corpus;
    4. only if every check passes, write the artifact (voxlm.export.artifact): the folder appears at `out`
       complete, or not at all.

`load_artifact` is the server's side: it checks the manifest and every file's hash, then builds the MAX
models from the precompiled graphs, so a server starts without compiling.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from voxlm.codec.model import Codec
from voxlm.codec.module import load_codec
from voxlm.data.text import normalize_text
from voxlm.eval.report import write_json
from voxlm.eval.tts_eval import build_cases, case_prompt
from voxlm.export import artifact, parity, sessions
from voxlm.runs import find_run
from voxlm.speechlm.model import load_speechlm, speechlm_codec, speechlm_folder
from voxlm.speechlm.sequences import generation_start
from voxlm.speechlm.tokenizer import SpeechTokenizer
from voxlm.speechlm.voices import Voice, list_voices, load_reference_audio, voice_for_codec

log = logging.getLogger(__name__)

SPEECHLM_DIR, CODEC_FILE, VOICES_DIR, GRAPHS_DIR = "speechlm", "codec/codec.pt", "voices", "graphs"


def latest_speechlm(runs_dir: Path) -> Path:
    """The newer of runs/rlhf/latest and runs/sft/latest: what a user just trained."""
    candidates = []
    for stage in ("rlhf", "sft"):
        try:
            candidates.append(speechlm_folder(find_run("latest", runs_dir, stage)))
        except FileNotFoundError:
            continue
    if not candidates:
        raise FileNotFoundError(f"no SFT or RLHF run under {runs_dir}: train one with `python train.py "
                                "stage=sft`, or pass speechlm=path/to/run")
    return max(candidates, key=lambda folder: (folder / "config.json").stat().st_mtime)


def max_models(speechlm_dir: Path, codec: Codec, device: str, dtype: str, perturb: float = 0.0) -> dict:
    """The MAX SpeechLM, codec decoder and codec encoder from the same weights as the PyTorch modules.
    `perturb` adds a constant to one SpeechLM weight of the MAX copy: the gate's self-test."""
    from transformers import LlamaConfig

    from voxlm.export.codec import MaxCodecDecoder, MaxCodecEncoder
    from voxlm.export.speechlm import MaxSpeechLM, load_state_dict

    state = load_state_dict(speechlm_dir)
    if perturb:
        name = "model.layers.0.mlp.down_proj.weight"
        state[name] = state[name] + perturb
        log.warning("parity self-test: %s of the MAX copy perturbed by %g", name, perturb)
    speechlm = MaxSpeechLM(LlamaConfig.from_pretrained(str(speechlm_dir)), state, device, dtype)
    return {"speechlm": speechlm, "decoder": MaxCodecDecoder.from_codec(codec, device=device),
            "encoder": MaxCodecEncoder.from_codec(codec, device=device)}


def gate_thresholds(cfg: DictConfig) -> dict[str, float]:
    """The parity thresholds of this export's device and dtype (configs/export.yaml, parity.thresholds)."""
    table = cfg.parity.thresholds
    if cfg.device not in table or cfg.dtype not in table[cfg.device]:
        known = ", ".join(f"device={d} dtype={t}" for d in table for t in table[d])
        raise ValueError(f"no parity thresholds for device={cfg.device} dtype={cfg.dtype} (configs/export"
                         f".yaml has {known}): measure that pair and add it under parity.thresholds")
    return OmegaConf.to_container(table[cfg.device][cfg.dtype])


def gate_cases(cfg: DictConfig, tok: SpeechTokenizer, codec: Codec) -> tuple[list, list[Any]]:
    """The gate's real inputs: test recordings from the corpus, and a generation prompt for each (the
    sentence, its voice prompt, and as generation starts: in the interleaved format, the first characters
    after the voice prompt)."""
    gate = cfg.parity
    cases = build_cases(cfg.data, gate.split, gate.reference_split, codec.sample_rate, int(gate.utterances),
                        float(gate.max_prompt_seconds))
    spoken = [tok.spoken_char_ids(normalize_text(case.text)) if tok.interleaved else None for case in cases]
    prompts = [generation_start(tok, case_prompt(tok, codec, case), chars)[0]
               for case, chars in zip(cases, spoken, strict=True)]
    return cases, prompts


def run_parity(cfg: DictConfig, thresholds: dict[str, float], torch_model: Any, tok: SpeechTokenizer,
               codec: Codec, models: dict, title: str = "Parity") -> list[parity.Check]:
    gate = cfg.parity
    cases, prompts = gate_cases(cfg, tok, codec)
    checks = parity.speechlm_checks(torch_model, models["speechlm"], tok, prompts, thresholds,
                                    int(gate.decode_steps), int(gate.greedy_tokens))
    write_report(gate.get("report"), checks, title, complete=False)  # kept if the codec checks then break
    checks += parity.codec_checks(codec, models["decoder"], models["encoder"], [case.audio for case in cases],
                                  thresholds, list(gate.stream_chunk_frames))
    write_report(gate.get("report"), checks, title, complete=True)
    return checks


def write_report(folder: str | Path | None, checks: list[parity.Check], title: str, complete: bool) -> None:
    """parity.report=<folder>: the measured values, passed or not, as parity.json + parity.md there (outside
    the artifact, which a failing check still keeps from being written). Nothing when the option is null."""
    if not folder:
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [check.row() for check in checks]
    write_json({"title": title, "complete": complete, "passed": complete and all(r["passed"] for r in rows),
                "checks": rows}, folder / "parity.json")
    (folder / "parity.md").write_text(parity.report_markdown(checks, title if complete else
                                                             f"{title} (SpeechLM checks only)"))


def source_folders(cfg: DictConfig) -> tuple[Path, Path]:
    """(SpeechLM folder, codec run folder) that `sources` names; the SpeechLM defaults to the newest run."""
    runs_dir = Path(cfg.paths.runs_dir)
    speechlm = speechlm_folder(cfg.sources.speechlm) if cfg.sources.speechlm else latest_speechlm(runs_dir)
    return speechlm, find_run(speechlm_codec(speechlm, cfg.sources.codec, "latest"), runs_dir, "codec")


def export_artifact(cfg: DictConfig) -> Path:
    """Export, gate, write; raises ParityError (and writes nothing at cfg.out) when a check fails."""
    thresholds = gate_thresholds(cfg)  # an unmeasured device/dtype pair is refused before anything loads
    speechlm_dir, codec_dir = source_folders(cfg)
    codec = load_codec(codec_dir).eval()
    torch_model, tok = load_speechlm(speechlm_dir, codec.codebook_size, "cpu", "float32",
                                     codec_id=codec.code_fingerprint())
    out = Path(cfg.out)
    log.info("exporting %s + %s for %s/%s to %s", speechlm_dir, codec_dir, cfg.device, cfg.dtype, out)

    def fill(folder: Path) -> dict[str, Any]:
        started = time.perf_counter()
        sessions.use_mefs(export_to=folder / GRAPHS_DIR)
        try:
            models = max_models(speechlm_dir, codec, cfg.device, cfg.dtype, float(cfg.parity.perturb))
            compile_seconds = time.perf_counter() - started
            title = f"Parity: {speechlm_dir} + {codec_dir} on {cfg.device}/{cfg.dtype}"
            checks = run_parity(cfg, thresholds, torch_model, tok, codec, models, title)
        finally:
            sessions.use_mefs()  # later graphs in this process compile as usual
        table = parity.report_markdown(checks, title)
        print(table)
        parity.raise_on_failure(checks)  # before anything but graphs was written: the folder is discarded
        write_json({"checks": [check.row() for check in checks], "passed": True}, folder / "parity.json")
        (folder / "parity.md").write_text(table)
        shutil.copytree(speechlm_dir, folder / SPEECHLM_DIR)
        (folder / CODEC_FILE).parent.mkdir(parents=True)
        shutil.copy2(codec_dir / "codec.pt", folder / CODEC_FILE)
        copy_voices(Path(cfg.voices_dir), folder / VOICES_DIR, codec)
        return {
            "device": cfg.device, "dtype": cfg.dtype, "sample_rate": codec.sample_rate,
            "frame_rate": codec.frame_rate, "codebook_size": codec.codebook_size,
            "vocab": json.loads((speechlm_dir / "speech_layout.json").read_text()),
            "sources": {"speechlm": str(speechlm_dir), "codec": str(codec_dir)},
            "compile_seconds": round(compile_seconds, 1),
        }

    return artifact.write_artifact(out, fill)


def copy_voices(source: Path, target: Path, codec: Codec) -> list[str]:
    """Ship the saved voices in this codec's codes: a voice of another codec is encoded again from its
    reference.wav (the recording ships as saved), and left out with a warning when it has none."""
    shipped, codec_id = [], codec.code_fingerprint()
    for name in list_voices(source):
        try:
            saved = Voice.load(source / name)
            reference_audio = load_reference_audio(source / name, source, codec.sample_rate)
            voice = voice_for_codec(saved, codec, reference_audio, codec_id=codec_id)
        except ValueError as error:
            log.warning("voice '%s' is not shipped: %s", name, error)
            continue
        shutil.copytree(source / name, target / name)
        if voice is not saved:
            log.info("voice '%s' encoded again with the artifact's codec", name)
            voice.save(target / name)
        shipped.append(name)
    return shipped


@dataclass
class LoadedArtifact:
    manifest: dict[str, Any]
    speechlm: Any            # MaxSpeechLM: the sampler's drop-in for the HF model
    tokenizer: SpeechTokenizer
    codec: Codec             # the PyTorch codec (config, and the reference the server can fall back to)
    decoder: Any             # MaxCodecDecoder
    encoder: Any             # MaxCodecEncoder
    voices_dir: Path


def load_artifact(folder: str | Path, device: str = "cpu") -> LoadedArtifact:
    """The MAX models of a verified artifact, from its precompiled graphs (no compile)."""
    from max.engine import MissingArtifactError

    from voxlm.export.codec import MaxCodecDecoder, MaxCodecEncoder
    from voxlm.export.speechlm import MaxSpeechLM

    folder = Path(folder)
    manifest = artifact.load_manifest(folder, device=device)
    codec = load_codec(folder / CODEC_FILE).eval()
    sessions.use_mefs(precompiled=folder / GRAPHS_DIR)
    try:
        speechlm = MaxSpeechLM.from_pretrained(folder / SPEECHLM_DIR, device, manifest["dtype"])
        decoder = MaxCodecDecoder.from_codec(codec, device=device)
        encoder = MaxCodecEncoder.from_codec(codec, device=device)
    except MissingArtifactError as error:
        # Compiling the missing graph would serve a graph the parity gate never saw.
        sources, versions = manifest.get("sources", {}), manifest.get("versions", {})
        raise artifact.ArtifactError(
            f"{folder} holds no graph '{error.graph_name}': it was exported by a voxlm that built other "
            f"graphs (voxlm {versions.get('voxlm', '?')}, MAX {versions.get('max', '?')}), and its parity "
            "proof covers those only. Export it again with this one: python export.py "
            f"speechlm={sources.get('speechlm', '<run>')} codec={sources.get('codec', '<run>')} out={folder}"
        ) from None
    finally:
        sessions.use_mefs()
    tok = SpeechTokenizer.from_pretrained(folder / SPEECHLM_DIR, codebook_size=codec.codebook_size,
                                          codec_id=codec.code_fingerprint())
    return LoadedArtifact(manifest, speechlm, tok, codec, decoder, encoder, folder / VOICES_DIR)

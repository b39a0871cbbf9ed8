"""The codec: shapes for every config, FSQ round trip, STFT inversion, causal streaming that equals the
offline decode, and CodecModule training on real (espeak-ng) speech: the mel loss falls, including the
adversarial phase; non-finite batches are skipped and counted; checkpoints rebuild the codec."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from conftest import train_config
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from voxlm.codec.align import cuts_from_log_probs, starts_from_log_probs, transcript_timings
from voxlm.codec.losses import CTCHead, SpeakerAdversary, latent_change
from voxlm.codec.model import FSQ, ISTFT, STFT, Codec
from voxlm.codec.module import CodecModule, load_codec, lr_factor
from voxlm.codec.stage import save_codec
from voxlm.eval.codec_eval import resynthesize
from voxlm.eval.tts_eval import decode_codes
from voxlm.speechlm.voices import decoding_voice

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Speech codecs turn sound into numbers.",
    "Please call Stella and ask her to bring these things.",
    "A stream of codes comes back as audio.",
]


def codec_config(name: str) -> dict:
    """A codec preset as Hydra composes it: a preset may build on another through its defaults list."""
    return OmegaConf.to_container(train_config("stage=codec", f"codec={name}").codec, resolve=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> list[torch.Tensor]:
    """A few espeak-ng sentences at 16 kHz."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/setup.sh installs it)")
    folder = tmp_path_factory.mktemp("speech")
    utterances = []
    for i, text in enumerate(SENTENCES):
        path = folder / f"{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True)
        audio, sr = sf.read(path, dtype="float32")
        utterances.append(torchaudio.functional.resample(torch.from_numpy(audio), sr, 16000))
    return utterances


# ------------------------------------------------------------------ model


@pytest.mark.parametrize("name", ["tiny", "quickstart", "quickstart-50hz", "base"])
def test_encode_decode_shapes(name: str) -> None:
    torch.manual_seed(0)
    cfg = codec_config(name)["model"]
    codec = Codec(**cfg).eval()
    hop = cfg["hop_length"]
    num_samples = 7 * hop + hop // 3  # not a multiple of hop: encode pads
    audio = 0.1 * torch.randn(2, num_samples)
    codes = codec.encode(audio)
    assert codes.dtype == torch.long and codes.shape == (2, 8)
    assert 0 <= codes.min() and codes.max() < codec.codebook_size
    assert codec.codebook_size == math.prod(cfg["levels"])
    assert codec.frame_rate == cfg["sample_rate"] / hop and codec.hop_length == hop
    assert codec.decode(codes).shape == (2, 8 * hop)
    out = codec(audio)
    assert out.audio.shape == audio.shape
    assert out.latents.shape == out.quantized.shape == (2, 8, len(cfg["levels"]))


def test_fsq_round_trip() -> None:
    fsq = FSQ([8, 5, 5, 5])
    codes = torch.arange(fsq.codebook_size)
    latents = fsq.codes_to_latent(codes)
    assert fsq.codebook_size == 1000 and latents.shape == (1000, 4)
    assert latents.abs().max() <= 1 and torch.unique(latents, dim=0).shape[0] == 1000
    torch.testing.assert_close(fsq.latent_to_codes(latents * fsq.half_width), codes, rtol=0, atol=0)

    z = torch.randn(3, 50, 4, requires_grad=True) * 3
    z.retain_grad()
    quantized, codes = fsq(z)
    assert codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 1000
    torch.testing.assert_close(fsq.codes_to_latent(codes), quantized.detach())
    torch.testing.assert_close(fsq.latent_to_codes(quantized * fsq.half_width), codes, rtol=0, atol=0)
    quantized.sum().backward()
    assert z.grad.abs().sum() > 0, "rounding must pass gradients straight through"


def test_istft_inverts_stft() -> None:
    n_fft, hop = 640, 160
    audio = torch.randn(2, 40 * hop, dtype=torch.float32)
    real, imag = STFT(n_fft, hop)(audio)
    istft = ISTFT(n_fft, hop)
    frames = istft.frames(real.transpose(1, 2), imag.transpose(1, 2))
    restored = istft.overlap_add(frames)[:, : audio.shape[1]]
    # Exact wherever every overlapping frame exists, i.e. after the first n_fft - hop samples.
    torch.testing.assert_close(restored[:, n_fft - hop:], audio[:, n_fft - hop:], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tiny_codec() -> Codec:
    torch.manual_seed(0)
    return Codec(**codec_config("tiny")["model"]).eval()


@pytest.mark.parametrize("sizes", [[1] * 50, [3, 1, 7, 2, 13, 1, 1, 22], [50], [12, 13, 25]])
def test_stream_equals_decode(tiny_codec: Codec, sizes: list[int]) -> None:
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, tiny_codec.codebook_size, (2, sum(sizes)), generator=generator)
    offline = tiny_codec.decode(codes)
    assert offline.std() > 1e-3, "a silent decoder would make this test vacuous"
    state = tiny_codec.init_stream(batch_size=2)
    chunks = []
    for chunk in codes.split(sizes, dim=1):
        audio, state = tiny_codec.stream(chunk, state)
        assert audio.shape == (2, chunk.shape[1] * tiny_codec.hop_length)
        chunks.append(audio)
    chunks.append(tiny_codec.flush(state))
    assert state.codes.shape[1] <= tiny_codec.left_context_frames
    assert (torch.cat(chunks, dim=1) - offline).abs().max() < 1e-5


def test_batched_encode_equals_encoding_each_clip_alone(speech: list[torch.Tensor]) -> None:
    """Tokenization batches clips of unequal length: zero padding must not change any clip's latents/codes."""
    torch.manual_seed(0)
    codec = Codec(**codec_config("tiny")["model"]).eval()
    lengths = torch.tensor([len(clip) for clip in speech])
    batch = codec.pad_to_hop(torch.nn.utils.rnn.pad_sequence(speech, batch_first=True))
    frames = (lengths + codec.hop_length - 1) // codec.hop_length
    with torch.no_grad():
        masked = codec.encoder(batch, frames)
        unmasked = codec.encoder(batch)
        for row, clip in enumerate(speech):
            alone = codec.encoder(codec.pad_to_hop(clip[None]))[0]
            assert alone.shape[0] == frames[row]
            assert (masked[row, : len(alone)] - alone).abs().max() < 1e-5
            if lengths[row] < lengths.max() - 4 * codec.hop_length:  # padded clips: padding must matter
                assert (unmasked[row, : len(alone)] - alone).abs().max() > 1e-3
    codes = codec.encode(batch, lengths)
    for row, clip in enumerate(speech):
        alone = codec.encode(clip[None])[0]
        assert torch.equal(codes[row, : len(alone)], alone)


def test_decoder_is_causal(tiny_codec: Codec) -> None:
    codes = torch.randint(0, tiny_codec.codebook_size, (1, 40), generator=torch.Generator().manual_seed(2))
    changed = codes.clone()
    changed[0, 30] = (codes[0, 30] + 1) % tiny_codec.codebook_size
    before, after = tiny_codec.decode(codes), tiny_codec.decode(changed)
    hop = tiny_codec.hop_length
    assert torch.equal(before[:, : 30 * hop], after[:, : 30 * hop])
    assert not torch.allclose(before[:, 30 * hop:], after[:, 30 * hop:])


def test_voice_codec_decodes_in_the_voice_it_is_given(speech: list[torch.Tensor]) -> None:
    """A codec with a voice encoder: decoding needs a voice, a different voice gives different audio, a
    stream in that voice equals the offline decode, and a clip's voice does not depend on its batch."""
    torch.manual_seed(0)
    codec = Codec(**{**codec_config("tiny")["model"], "voice_dim": 8}).eval()
    plain = Codec(**codec_config("tiny")["model"]).eval()
    assert codec.has_voice and not plain.has_voice
    codes = codec.encode(speech[0][None])
    voices = [codec.voice(clip[None]) for clip in speech[1:3]]
    assert voices[0].shape == (1, 8)
    with pytest.raises(ValueError, match="needs a voice"):
        codec.decode(codes)
    with pytest.raises(ValueError, match="no voice encoder"):
        plain.voice(speech[1][None])
    first, second = (codec.decode(codes, voice) for voice in voices)
    assert first.shape == (1, codes.shape[1] * codec.hop_length)
    assert (first - second).abs().max() > 1e-3
    state, pieces = codec.init_stream(1, voices[0]), []
    for start in range(0, codes.shape[1], 7):
        audio, state = codec.stream(codes[:, start: start + 7], state)
        pieces.append(audio)
    torch.testing.assert_close(torch.cat(pieces, dim=1), first, rtol=1e-4, atol=1e-5)
    # In a batch padded to the longer clip, the shorter clip's voice is its voice alone.
    short, long = speech[1], speech[2]
    batch = torch.zeros(2, max(len(short), len(long)))
    batch[0, : len(short)], batch[1, : len(long)] = short, long
    batched = codec.voice(batch, torch.tensor([len(short), len(long)]))
    alone = codec.voice(codec.pad_to_hop(short)[None])[0]
    torch.testing.assert_close(batched[0], alone, rtol=1e-4, atol=1e-5)
    # Evaluation and synthesis decode in the voice of the prompt's reference clip, and refuse to guess one.
    audio = decode_codes(codec, codes[0], decoding_voice(codec, speech[1].numpy()))
    np.testing.assert_allclose(audio, first[0].numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="reference clip"):
        decoding_voice(codec, None)
    with pytest.raises(ValueError, match="needs a voice"):
        decode_codes(codec, codes[0])
    assert decoding_voice(plain, speech[1].numpy()) is None
    # The codec's own evaluation decodes each clip in its own voice, streamed as offline.
    resynthesized = resynthesize(codec, speech[0].numpy(), [4, 9])
    np.testing.assert_allclose(resynthesized["streamed"], resynthesized["offline"], atol=1e-5)
    own = codec.decode(codes, codec.voice(speech[0][None]))[0, : len(speech[0])].numpy()
    np.testing.assert_allclose(resynthesized["offline"], own, atol=1e-5)


def test_speaker_adversary_reverses_its_gradient_into_the_codes() -> None:
    """The classifier learns to name the speaker (its own gradient is the cross-entropy's); the latents get
    the cross-entropy's gradient negated, so the encoder learns to hide the speaker."""
    torch.manual_seed(0)
    adversary = SpeakerAdversary(3, 8, 3, ["alice", "bob"])
    latents = torch.randn(2, 10, 3, requires_grad=True)
    lengths = torch.tensor([10, 6])
    loss = adversary(latents, lengths, ["alice", "bob"])
    loss.backward()
    reversed_latents, reversed_head = latents.grad.clone(), adversary.head.weight.grad.clone()
    # The same cross-entropy computed without the reversal.
    latents.grad, adversary.head.weight.grad = None, None
    x = adversary.net(latents.transpose(1, 2))
    mask = (torch.arange(10) < lengths[:, None]).unsqueeze(1).float()
    logits = adversary.head((x * mask).sum(-1) / mask.sum(-1))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    torch.testing.assert_close(reversed_latents, -latents.grad)
    torch.testing.assert_close(reversed_head, adversary.head.weight.grad)
    assert float(adversary.last_accuracy) == float((logits.argmax(-1) == torch.tensor([0, 1])).float().mean())
    with pytest.raises(ValueError, match="not among the codec's training speakers"):
        adversary(latents, lengths, ["alice", "carol"])


def test_voice_codec_trains_with_the_speaker_adversary(speech, tmp_path: Path) -> None:
    """A voice codec with the adversary on: both train (finite losses, the adversary's accuracy logged),
    and the saved codec loads back with its voice encoder."""
    torch.manual_seed(0)
    cfg = codec_config("tiny")
    cfg["model"]["voice_dim"] = 8
    cfg["loss"]["weights"] |= {"ctc": 0.0, "speaker_adversary": 1.0}
    cfg["optim"]["total_steps"] = 6
    module = CodecModule(cfg["model"], cfg["optim"], cfg["loss"], cfg["log"], speakers=["us", "gb"])
    batches = batches_of(speech, crop=16000, batch_size=2, texts=SENTENCES)
    for batch in batches:
        batch["speakers"] = ["us", "gb"]
    recorder = Recorder()
    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[recorder])
    trainer.fit(module, train_dataloaders=loader(batches * 3))
    last = recorder.history[-1]
    assert np.isfinite(last["train/speaker_adversary"]) and 0.0 <= last["train/speaker_accuracy"] <= 1.0
    codec = load_codec(save_codec(module, tmp_path / "codec.pt"))
    assert codec.has_voice
    voice = codec.voice(speech[0][None])
    torch.testing.assert_close(codec.decode(codec.encode(speech[0][None]), voice),
                               module.codec.eval().decode(module.codec.encode(speech[0][None]), voice))


def test_left_context_shorter_than_receptive_field_is_refused() -> None:
    cfg = codec_config("tiny")["model"] | {"left_context_frames": 5}
    with pytest.raises(ValueError, match="receptive field"):
        Codec(**cfg)


# ------------------------------------------------------------------ losses and schedule


def test_ctc_text_encoding() -> None:
    head = CTCHead(latent_dim=4, dim=8, kernel_size=3, alphabet=" abcdefghijklmnopqrstuvwxyz'")
    assert head.encode_text("Hi,  there!") == head.encode_text("hi there")


def test_lr_schedule() -> None:
    assert lr_factor(0, 10, 100, 0.1, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1, "cosine") == pytest.approx(0.1)
    assert lr_factor(100, 10, 100, 0.1, "exponential") == pytest.approx(0.1)
    assert 0.1 < lr_factor(55, 10, 100, 0.1, "cosine") < 1.0


# ------------------------------------------------------------------ training


def loader(batches: list[dict]) -> DataLoader:
    """Ready-made batches, in order (a bare list would read as a list of dataloaders to Lightning)."""
    return DataLoader(batches, batch_size=None, shuffle=False)


def batches_of(utterances: list[torch.Tensor], crop: int, batch_size: int, texts: list[str]) -> list[dict]:
    """Fixed batches: each utterance cropped (or zero-padded) to `crop` samples from its middle."""
    batches = []
    for start in range(0, len(utterances), batch_size):
        items = utterances[start: start + batch_size]
        audio = torch.zeros(len(items), crop)
        lengths = torch.zeros(len(items), dtype=torch.long)
        for row, u in enumerate(items):
            offset = max(0, (len(u) - crop) // 2)
            piece = u[offset: offset + crop]
            audio[row, : len(piece)] = piece
            lengths[row] = len(piece)
        batches.append({"audio": audio, "lengths": lengths, "texts": texts[start: start + batch_size]})
    return batches


class Recorder(L.Callback):
    def __init__(self):
        self.history: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.history.append({k: float(v) for k, v in metrics.items() if k.startswith("train/")})


def make_trainer(root: Path, max_steps: int, callbacks=(), val_check_interval: int | None = None
                 ) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=list(callbacks), num_sanity_val_steps=0, limit_val_batches=1,
        val_check_interval=val_check_interval, check_val_every_n_epoch=None if val_check_interval else 1,
        log_every_n_steps=1,
    )


def tiny_module(**loss_overrides) -> CodecModule:
    cfg = codec_config("tiny")
    cfg["loss"] |= loss_overrides
    cfg["optim"]["total_steps"] = 30
    return CodecModule(cfg["model"], cfg["optim"], cfg["loss"], cfg["log"])


@pytest.fixture(scope="module")
def trained(speech, tmp_path_factory):
    """30 steps of tiny: mel only for 15, then with the discriminators (on 0.25 s of each 0.5 s crop);
    validation at the end."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("codec_run")
    module = tiny_module(adversarial_start_step=15, adversarial_segment_seconds=0.25)
    pieces = [u[i * 8000: (i + 1) * 8000] for u in speech for i in range(len(u) // 8000)]
    train = batches_of(pieces[:8], crop=8000, batch_size=4, texts=["x"] * 8)
    val = batches_of(speech[:2], crop=16000, batch_size=2, texts=SENTENCES[:2])
    recorder = Recorder()
    trainer = make_trainer(root, max_steps=30, callbacks=[recorder], val_check_interval=30)
    trainer.fit(module, train_dataloaders=loader(train * 15), val_dataloaders=loader(val))
    return trainer, module, recorder.history, root


def test_mel_loss_decreases_through_adversarial_phase(trained) -> None:
    trainer, module, history, _ = trained
    assert trainer.global_step == 30, "global_step counts generator steps (batches), not both optimizers"
    mel = [h["train/mel"] for h in history]
    assert np.mean(mel[-5:]) < 0.85 * np.mean(mel[:5]), mel
    assert "train/loss_d" not in history[14] and "train/loss_d" in history[-1]
    assert np.isfinite(history[-1]["train/adversarial"])
    assert np.isfinite(history[-1]["train/feature_matching"])
    assert np.mean(mel[-3:]) < np.mean(mel[12:15]) * 1.05, "the adversarial phase must not wreck the mel loss"
    assert module.nonfinite_steps == 0 and "val_mel_loss" in module.training_summary()


def test_validation_writes_samples(trained) -> None:
    _, _, _, root = trained
    names = {p.name for p in (root / "samples").iterdir()}
    expected = {f"step0000030_0_{kind}" for kind in ("original.wav", "reconstruction.wav", "mel.png")}
    assert expected <= names
    audio, sr = sf.read(root / "samples" / "step0000030_0_reconstruction.wav")
    assert sr == 16000 and len(audio) == 16000 and np.abs(audio).max() > 0


def test_checkpoint_round_trip(trained, tmp_path: Path) -> None:
    trainer, module, _, _ = trained
    path = tmp_path / "codec.ckpt"
    trainer.save_checkpoint(path)
    restored = CodecModule.load_from_checkpoint(path)
    assert restored.model_cfg == module.model_cfg and restored.loss_cfg == module.loss_cfg
    codec = load_codec_eval(path)
    assert not codec.training
    audio = 0.1 * torch.randn(1, 4000, generator=torch.Generator().manual_seed(3))
    reference = module.codec.eval()
    torch.testing.assert_close(codec.encode(audio), reference.encode(audio), rtol=0, atol=0)
    codes = reference.encode(audio)
    torch.testing.assert_close(codec.decode(codes), reference.decode(codes), rtol=0, atol=0)
    torch.testing.assert_close(restored.codec.eval().decode(codes), reference.decode(codes), rtol=0, atol=0)


def load_codec_eval(path: Path) -> Codec:
    from voxlm.codec.module import load_codec

    return load_codec(path)


def test_nonfinite_batches_are_skipped_and_counted(speech, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = tiny_module(adversarial_start_step=2)
    good = batches_of(speech, crop=8000, batch_size=2, texts=SENTENCES)
    bad = {**good[0], "audio": torch.full_like(good[0]["audio"], float("nan"))}
    batches = [good[0], bad, good[1], bad, good[0], good[1]]
    make_trainer(tmp_path, max_steps=4).fit(module, train_dataloaders=loader(batches))
    assert module.nonfinite_steps == 2 and module.trainer.global_step == 4
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert all(torch.isfinite(b).all() for b in module.codec.buffers()), "NaN must not reach BatchNorm"

    module = tiny_module()
    module.optim_cfg["max_consecutive_nonfinite"] = 3
    with pytest.raises(RuntimeError, match="3 consecutive batches had a non-finite"):
        make_trainer(tmp_path, max_steps=10).fit(module, train_dataloaders=loader([bad] * 5))


def test_ctc_head_trains_on_whole_utterances(speech, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = tiny_module(weights={"mel": 15.0, "feature_matching": 2.0, "adversarial": 1.0, "ctc": 1.0})
    # Crops longer than every utterance: each is padded, hence whole, hence its text matches its audio.
    crop = max(len(u) for u in speech) + 160
    batches = batches_of(speech, crop=crop, batch_size=2, texts=SENTENCES) * 4
    recorder = Recorder()
    make_trainer(tmp_path, max_steps=8, callbacks=[recorder]).fit(module, train_dataloaders=loader(batches))
    ctc = [h["train/ctc"] for h in recorder.history]
    assert all(np.isfinite(ctc)) and ctc[0] > 0.5
    assert np.mean(ctc[-2:]) < ctc[0], ctc


def test_latent_change_is_mean_step_in_level_units_without_padding() -> None:
    steady_then_jump = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [2.0, 0.0], [9.0, 9.0]]])  # frame 3: padding
    assert float(latent_change(steady_then_jump)) == pytest.approx((0 + 1 + 8) / 3)
    assert float(latent_change(steady_then_jump, torch.tensor([3]))) == pytest.approx((0 + 1) / 2)


def test_stability_penalty_makes_codes_repeat(speech, tmp_path: Path) -> None:
    """The same steps from the same start, with and without the penalty: with it the latents move less from
    frame to frame and more frames keep the previous frame's code."""
    batches = batches_of(speech, crop=16000, batch_size=2, texts=SENTENCES) * 6
    audio = torch.cat([batch["audio"] for batch in batches[:2]])
    results = {}
    for weight in (0.0, 20.0):
        torch.manual_seed(0)
        module = tiny_module(weights={"mel": 15.0, "feature_matching": 2.0, "adversarial": 1.0, "ctc": 0.0,
                                      "stability": weight})
        recorder = Recorder()
        trainer = make_trainer(tmp_path, max_steps=12, callbacks=[recorder])
        trainer.fit(module, train_dataloaders=loader(batches))
        codec = module.codec.eval()
        with torch.no_grad():
            change = float(latent_change(codec.quantizer.bound(codec.encoder(audio))))
        codes = codec.encode(audio)
        results[weight] = (change, float((codes[:, 1:] == codes[:, :-1]).float().mean()), recorder.history)
    (change_off, repeat_off, history_off), (change_on, repeat_on, history_on) = results[0.0], results[20.0]
    assert "train/stability" not in history_off[-1] and np.isfinite(history_on[-1]["train/stability"])
    assert history_on[-1]["train/stability"] < history_on[0]["train/stability"]
    assert change_on < 0.7 * change_off, (change_on, change_off)
    assert repeat_on > repeat_off + 0.1, (repeat_on, repeat_off)
    assert 0.0 <= history_on[-1]["train/code_repeat"] <= 1.0


# --- word timings by forced alignment (voxlm.codec.align) -------------------------------------------------

def spiky_log_probs(frames: int, classes: int, at: dict[int, int]) -> torch.Tensor:
    """CTC log-probabilities that say blank everywhere but at the given frames, which say the given class."""
    logits = torch.full((frames, classes), -10.0)
    logits[:, 0] = 0.0
    for frame, cls in at.items():
        logits[frame, 0], logits[frame, cls] = -10.0, 0.0
    return logits.log_softmax(-1)


def test_forced_alignment_cuts_in_the_gaps_between_words() -> None:
    head = CTCHead(4, 8, 3, " abcdefghijklmnopqrstuvwxyz'")
    words = "cab 42 ba ab".split()  # "42" has no character the head reads
    chars = [head.encode_text(w) for w in words]
    space = head.char_to_id[" "]
    # c a b at frames 2-4, the space at 10, b a at 15-16, the space at 20, a b at 27-28 (40 frames in all)
    at = {2: chars[0][0], 3: chars[0][1], 4: chars[0][2], 10: space, 15: chars[2][0], 16: chars[2][1],
          20: space, 27: chars[3][0], 28: chars[3][1]}
    cuts = cuts_from_log_probs(spiky_log_probs(40, 29, at), chars, space)
    assert cuts[0] == 0 and cuts[-1] == 40 and len(cuts) == len(words) + 1
    assert cuts == sorted(cuts)
    assert 5 <= cuts[2] <= 15 and 17 <= cuts[3] <= 27  # between the last letter of one word and the next
    assert cuts[1] == cuts[2]  # the unreadable word gets no frames: "cab" keeps what sounds until "ba"
    assert cuts_from_log_probs(spiky_log_probs(40, 29, at), [[], []], space) is None
    assert cuts_from_log_probs(spiky_log_probs(5, 29, {}), chars, space) is None  # 9 characters, 5 frames


def test_character_starts_fall_between_the_aligned_characters() -> None:
    head = CTCHead(4, 8, 3, " abcdefghijklmnopqrstuvwxyz'")
    chars = head.encode_text("Ab - c!")  # the dash and "!" are not read; the spaces around the dash are one
    assert chars == [head.char_to_id[c] for c in "ab c"]
    at = {3: chars[0], 9: chars[1], 14: chars[2], 22: chars[3]}  # a b ' ' c, one spike each (30 frames)
    starts = starts_from_log_probs(spiky_log_probs(30, 29, at), chars)
    assert len(starts) == 4 and starts[0] == 0 and starts == sorted(starts)
    assert 4 <= starts[1] <= 9 and 10 <= starts[2] <= 14 and 15 <= starts[3] <= 22
    assert starts_from_log_probs(spiky_log_probs(3, 29, {}), chars) is None  # 4 characters, 3 frames
    assert starts_from_log_probs(spiky_log_probs(30, 29, at), []) is None


def test_transcript_timings_read_codes_through_the_head() -> None:
    torch.manual_seed(0)
    head, quantizer = CTCHead(4, 8, 3, " abcdefghijklmnopqrstuvwxyz'").eval(), FSQ([4, 4, 2, 2])
    codes = np.random.default_rng(0).integers(0, 64, 120)
    cuts, starts = transcript_timings(head, quantizer, codes, "Hello there, world!")
    assert len(cuts) == 4 and cuts[0] == 0 and cuts[-1] == 120 and cuts == sorted(cuts)
    assert transcript_timings(head, quantizer, codes[:6], "Hello there, world!") == (None, None)
    assert len(starts) == len("hello there world") and starts[0] == 0 and starts == sorted(starts)
    assert starts[-1] < 120

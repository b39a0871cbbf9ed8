"""The MAX port of the codec (voxlm.export.codec) against PyTorch: tiny config, seeded random weights (with
BatchNorm running statistics moved away from (0, 1), as after training, so that folding them is tested), real
flite speech for the encoder.

Decode: offline and streamed (several chunk schedules, batch > 1) against PyTorch's offline decode.
Encode: codes equal PyTorch's on real speech, alone and in a zero-padded batch of unequal clips. A codec
with a voice encoder: its voice graph gives PyTorch's voice vectors, and its decoder graph decodes in them.
The graphs are compiled once per process and shared by every test here (cold: ~1.5 min each on 2 cores,
hence `slow`; MAX's on-disk cache makes later runs take seconds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SENTENCE_A, SENTENCE_B, speak
from omegaconf import OmegaConf

from voxlm.codec.model import Codec
from voxlm.export.codec import MaxCodecDecoder, MaxCodecEncoder
from voxlm.export.parity import stream_in_chunks

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MIN_SNR_DB = 50.0  # float32 ports of the same ops: ~125 dB measured, so 50 dB leaves room for other CPUs


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    assert reference.shape == estimate.shape
    noise = float(np.sum((reference.astype(np.float64) - estimate) ** 2))
    return 10 * np.log10(float(np.sum(reference.astype(np.float64) ** 2)) / max(noise, 1e-30))


@pytest.fixture(scope="module")
def codec() -> Codec:
    torch.manual_seed(0)
    codec = Codec(**OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "codec" / "tiny.yaml").model))
    norm = codec.encoder.latent_norm
    with torch.no_grad():
        norm.running_mean.normal_(0, 0.2)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.1)
    return codec.eval()


@pytest.fixture(scope="module")
def decoder(codec: Codec) -> MaxCodecDecoder:
    return MaxCodecDecoder.from_codec(codec)


@pytest.fixture(scope="module")
def encoder(codec: Codec) -> MaxCodecEncoder:
    return MaxCodecEncoder.from_codec(codec)


@pytest.fixture(scope="module")
def voiced_codec(codec: Codec) -> Codec:
    """The tiny codec with a voice encoder (voice_dim 8), its voice projection scaled up so that the voice
    changes the audio as much as a trained one does (untrained, it starts near zero)."""
    torch.manual_seed(1)
    voiced = Codec(**{**codec.config, "voice_dim": 8})
    voiced.load_state_dict(codec.state_dict(), strict=False)
    with torch.no_grad():
        voiced.decoder.voice_proj.weight.normal_(0, 0.5)
        voiced.decoder.voice_proj.bias.normal_(0, 0.5)
    return voiced.eval()


@pytest.fixture(scope="module")
def slt_speech(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """Two flite slt sentences at 16 kHz (~3-4 s each)."""
    folder = tmp_path_factory.mktemp("slt")
    clips = [speak(folder / f"{i}.wav", "flite", "slt", text)
             for i, text in enumerate([SENTENCE_A, SENTENCE_B])]
    assert all(rate == 16000 for _, rate in clips)
    return [audio for audio, _ in clips]


def random_codes(codec: Codec, batch: int, frames: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, codec.codebook_size, (batch, frames), generator=generator)


def test_offline_decode_matches_pytorch(codec: Codec, decoder: MaxCodecDecoder) -> None:
    # 3 frames is shorter than the decoder's context (12 slots): the empty slots must act as zero padding.
    for frames in (57, 3):
        codes = random_codes(codec, 3, frames, seed=frames)
        reference, exported = codec.decode(codes).numpy(), decoder.decode(codes).numpy()
        assert exported.shape == reference.shape == (3, frames * codec.hop_length)
        for row in range(3):
            assert snr_db(reference[row], exported[row]) >= MIN_SNR_DB, (frames, row)


@pytest.mark.parametrize("schedule", [[10, 25, 50], [1], [7, 3]])
def test_streaming_decode_matches_the_offline_decode(codec: Codec, decoder: MaxCodecDecoder,
                                                     schedule: list[int]) -> None:
    codes = random_codes(codec, 1, 140, seed=2)
    reference = codec.decode(codes)[0].numpy()
    streamed = stream_in_chunks(decoder, codes, schedule)
    assert snr_db(reference, streamed) >= MIN_SNR_DB


def test_streaming_a_batch_and_state_shared_with_pytorch(codec: Codec, decoder: MaxCodecDecoder) -> None:
    """Rows of a batch stream independently; a PyTorch StreamState continues on MAX (a server can switch)."""
    codes = random_codes(codec, 2, 60, seed=3)
    reference = codec.decode(codes).numpy()
    audio, state = codec.stream(codes[:, :20], codec.init_stream(2))  # 20 frames on PyTorch, then MAX
    pieces = [audio.numpy()]
    for start in range(20, 60, 15):
        audio, state = decoder.stream(codes[:, start: start + 15], state)
        pieces.append(audio.numpy())
    pieces.append(decoder.flush(state).numpy())
    streamed = np.concatenate(pieces, axis=1)
    for row in range(2):
        assert snr_db(reference[row], streamed[row]) >= MIN_SNR_DB, row
    empty, same = decoder.stream(codes[:, :0], state)
    assert empty.shape == (2, 0) and same is state


def test_encoder_gives_pytorch_codes_on_real_speech(codec: Codec, encoder: MaxCodecEncoder,
                                                    slt_speech: list[np.ndarray]) -> None:
    agree = total = 0
    for audio in slt_speech:
        clip = torch.from_numpy(audio)[None]
        reference, exported = codec.encode(clip), encoder.encode(clip)
        assert exported.dtype == torch.int64 and exported.shape == reference.shape
        agree, total = agree + int((exported == reference).sum()), total + reference.numel()
    assert len(torch.cat([codec.encode(torch.from_numpy(a)[None])[0] for a in slt_speech]).unique()) > 8
    print(f"encoder code agreement on real speech: {agree}/{total} = {agree / total:.4%}")
    assert agree / total >= 0.99  # an FSQ rounding tie may flip a rare frame


def test_encoder_batch_of_unequal_clips(codec: Codec, encoder: MaxCodecEncoder,
                                        slt_speech: list[np.ndarray]) -> None:
    """Zero-padded to the longest clip, with lengths: each clip's codes as PyTorch's (and as alone); a clip
    that is not a multiple of hop is zero-padded like Codec.encode."""
    short, long = sorted(slt_speech, key=len)
    short = short[: len(short) - 37]
    batch = torch.zeros(2, len(long))
    batch[0, : len(short)], batch[1] = torch.from_numpy(short), torch.from_numpy(long)
    lengths = torch.tensor([len(short), len(long)])
    reference, exported = codec.encode(batch, lengths), encoder.encode(batch, lengths)
    frames = -(-len(short) // codec.hop_length)
    assert (exported == reference).float().mean() >= 0.99
    alone = encoder.encode(torch.from_numpy(short)[None])
    assert alone.shape == codec.encode(torch.from_numpy(short)[None]).shape == (1, frames)
    assert (exported[0, :frames] == alone[0]).float().mean() >= 0.99


def test_a_voice_codec_runs_on_max_as_in_pytorch(voiced_codec: Codec, slt_speech: list[np.ndarray]) -> None:
    """The voice graph gives PyTorch's voice vectors for real speech, alone and in a zero-padded batch; the
    decoder graph decodes in them, offline and streamed (a PyTorch stream continues on MAX, its voice with
    it), and refuses to decode without one."""
    decoder, encoder = MaxCodecDecoder.from_codec(voiced_codec), MaxCodecEncoder.from_codec(voiced_codec)
    assert decoder.has_voice and encoder.has_voice
    lengths = torch.tensor([len(a) for a in slt_speech])
    batch = torch.zeros(2, int(lengths.max()))
    for row, audio in enumerate(slt_speech):
        batch[row, : len(audio)] = torch.from_numpy(audio)
    with torch.no_grad():
        reference = voiced_codec.voice(batch, lengths)
    exported = encoder.voice(batch, lengths)
    assert exported.shape == (2, 8)
    for row, audio in enumerate(slt_speech):
        assert snr_db(reference[row].numpy(), exported[row].numpy()) >= MIN_SNR_DB
        alone = encoder.voice(torch.from_numpy(audio)[None])[0].numpy()
        assert snr_db(reference[row].numpy(), alone) >= MIN_SNR_DB

    codes = voiced_codec.encode(torch.from_numpy(slt_speech[0])[None])
    other = reference[:1].flip(-1)  # both clips are slt's: a voice far from theirs
    with torch.no_grad():
        offline = voiced_codec.decode(codes, reference[:1]).numpy()
        in_other = voiced_codec.decode(codes, other).numpy()
    assert snr_db(offline[0], in_other[0]) < 20  # the voice changes the audio (the test can fail)
    assert snr_db(offline[0], decoder.decode(codes, reference[:1])[0].numpy()) >= MIN_SNR_DB
    assert snr_db(in_other[0], decoder.decode(codes, other)[0].numpy()) >= MIN_SNR_DB
    streamed = stream_in_chunks(decoder, codes, [10, 25, 50], reference[:1])
    assert snr_db(offline[0], streamed) >= MIN_SNR_DB
    audio, state = voiced_codec.stream(codes[:, :20], voiced_codec.init_stream(1, reference[:1]))
    pieces = [audio.numpy()]
    for start in range(20, codes.shape[1], 15):
        audio, state = decoder.stream(codes[:, start: start + 15], state)
        pieces.append(audio.numpy())
    assert snr_db(offline[0], np.concatenate(pieces, axis=1)[0]) >= MIN_SNR_DB
    with pytest.raises(ValueError, match="needs a voice"):
        decoder.decode(codes)
    with pytest.raises(ValueError, match=r"expected \(1, 8\)"):
        decoder.init_stream(1, reference)

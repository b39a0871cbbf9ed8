"""Token sequences the SpeechLM trains on: prompt formats, loss masks, the pretraining mixture, packing, and
the SFT dataset over code shards.

Labels follow the Hugging Face convention: `labels` is aligned with `input_ids` (the model shifts them), and
IGNORE (-100) marks positions without loss. Formats (K = codes, [x] = one token):

    tts (SFT, voice cloning)  [bos] [text_start] prompt transcript + " " + text [text_end]
                              [speech_start] prompt codes  target codes [speech_end] [eos]
                              loss: target codes + [speech_end] only. The voice prompt's codes carry no loss:
                              the model learns to continue a given voice, not to invent the prompt.
    text_speech (pretrain)    the tts format without a voice prompt; loss on the speech + [speech_end] only:
                              the "text" source already trains text prediction, and this one spends its
                              gradient on the task itself (speech given text).
    phrase (pretrain)         text_speech for a few consecutive words of an utterance and their codes, cut
                              at the word timings the tokenize stage stored (voxlm.codec.align): which text
                              goes with which speech is plain in a short pair, so a model can learn what
                              text sounds like before it aligns whole sentences (not enough on its own at
                              the quickstart budget: docs/benchmarks.md)
    continuation (pretrain)   [bos] [speech_start] codes [speech_end] [eos]; loss: codes + [speech_end]
    text (pretrain)           [bos] text [eos]; loss: text + [eos]
[bos] never carries loss, which is what makes packing simple (see `pack`). Generation stops at [speech_end].

The interleaved format (a tokenizer with a spoken alphabet, `SpeechTokenizer.interleaved`; after ELLA-V,
Song et al. 2024) puts each spoken character of the text into the speech, right before its codes, at the
character timings the tokenize stage stored (`char_starts`, voxlm.codec.align):

    tts / text_speech         [bos] [text_start] text [text_end] [speech_start] ([voice_start] prompt codes
                              [voice_end]) c1 codes(c1) c2 codes(c2) ... [speech_end] [eos]
                              loss: <|advance|> at each character, the codes, [speech_end]
The model never has to find its place in the text: the character it is saying sits right before the codes
it predicts, and it only decides when to move on (<|advance|>); generation then feeds the next character
(voxlm.speechlm.generate). A voice prompt is its codes alone: no transcript is needed. With a lookahead of k
characters (`tok.spoken_feeds`), c1 .. c(k+1) come before codes(c1), each advance brings the character k
ahead, and <|advance|> itself stands in for the characters once all are given:

    lookahead 2               c1 c2 c3 codes(c1) c4 codes(c2) ... cn codes(c(n-2)) [advance] codes(c(n-1))
                              [advance] codes(cn) [speech_end]

A tokenizer that speaks phonemes (voxlm.data.phonemes) puts the text's phonemes and word boundaries where the
characters go, each at a timing read off its word's aligned letters (`tok.spoken_timings`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from voxlm.data.shards import CodedUtterance, CodeShards
from voxlm.speechlm.tokenizer import SpeechTokenizer

log = logging.getLogger(__name__)

IGNORE = -100
SOURCES = ("continuation", "text", "text_speech", "phrase")  # the pretraining mixture's example kinds


@dataclass(frozen=True)
class Example:
    input_ids: np.ndarray  # int64 [T]
    labels: np.ndarray     # int64 [T]: input_ids where there is loss, IGNORE elsewhere

    def __len__(self) -> int:
        return len(self.input_ids)


def _ids(*parts: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1) for p in parts])


def tts_prompt(tok: SpeechTokenizer, text: str, prompt_text: str | None = None,
               prompt_codes: np.ndarray | None = None) -> np.ndarray:
    """What generation starts from: the tts format up to the voice prompt's last code (or [speech_start]);
    in the interleaved format, up to [voice_end] (the prompt's transcript is not used)."""
    if (prompt_text is None) != (prompt_codes is None):
        raise ValueError("a voice prompt needs both its transcript and its codes")
    if tok.interleaved:
        voice = ([] if prompt_codes is None else
                 _ids([tok.voice_start_id], tok.code_to_token(np.asarray(prompt_codes)), [tok.voice_end_id]))
        return _ids([tok.bos_id, tok.text_start_id], tok.encode_text(text.strip()), [tok.text_end_id],
                    [tok.speech_start_id], voice)
    if prompt_codes is not None:
        # One text span for both: the model reads where the prompt's words end and the target's begin.
        text = prompt_text.strip() + " " + text.strip()
        speech = tok.code_to_token(np.asarray(prompt_codes))
    else:
        speech = np.zeros(0, np.int64)
    return _ids([tok.bos_id, tok.text_start_id], tok.encode_text(text.strip()), [tok.text_end_id],
                [tok.speech_start_id], speech)


def generation_start(tok: SpeechTokenizer, prompt: np.ndarray,
                     char_ids: Sequence[int] | None = None) -> tuple[np.ndarray, list[int]]:
    """What generation reads before the first code, and what it feeds at each later <|advance|>: a plain
    model's tts_prompt as it is, and []; an interleaved model's with the text's first spoken characters
    (`char_ids`, with the lookahead's) appended, and the rest (`tok.spoken_feeds`)."""
    if not tok.interleaved:
        return np.asarray(prompt), []
    first, later = tok.spoken_feeds(char_ids or [])
    return _ids(prompt, first), later


def tts_sequence(tok: SpeechTokenizer, text: str, codes: np.ndarray, prompt_text: str | None = None,
                 prompt_codes: np.ndarray | None = None, char_starts: Sequence[int] | None = None) -> Example:
    """The tts format for `text` spoken as `codes`, optionally after a voice prompt; loss on target speech.
    The interleaved format needs the text's `char_starts` in the codes (its letters', as the shards hold
    them; `tok.spoken_timings` turns them into its phonemes' where it speaks phonemes)."""
    prompt = tts_prompt(tok, text, prompt_text, prompt_codes)
    if tok.interleaved:
        if char_starts is None:
            raise ValueError("the interleaved format needs the character timings of the speech (char_starts)")
        starts = tok.spoken_timings(text, char_starts, len(codes))
        if starts is None:
            raise ValueError(f"the phonemes of {text!r} do not fit its {len(codes)} codes")
        target, target_labels = interleaved_speech(tok, codes, tok.spoken_char_ids(text), starts)
    else:
        target = target_labels = _ids(tok.code_to_token(np.asarray(codes)), [tok.speech_end_id])
    input_ids = _ids(prompt, target, [tok.eos_id])
    labels = np.full_like(input_ids, IGNORE)
    labels[len(prompt): len(prompt) + len(target)] = target_labels
    return Example(input_ids, labels)


def interleaved_speech(tok: SpeechTokenizer, codes: np.ndarray, char_ids: Sequence[int],
                       char_starts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, labels) of the interleaved format's speech: before the codes of character i
    (codes[starts[i]:starts[i + 1]]) come the tokens `tok.spoken_feeds` gives for it (with lookahead 0, the
    character itself), then [speech_end]. The first token fed at each character is labelled <|advance|>: the
    model learns when to move on, never which character comes (generation feeds it)."""
    if len(char_ids) != len(char_starts):
        raise ValueError(f"{len(char_ids)} spoken characters but {len(char_starts)} character timings: the "
                         "code shards were aligned with another alphabet than the tokenizer's")
    first, later = tok.spoken_feeds(char_ids)
    code_ids = tok.code_to_token(np.asarray(codes))
    ends = [*char_starts[1:], len(code_ids)]
    ids, labels = list(first), [tok.advance_id] + [IGNORE] * (len(first) - 1)
    for i, (start, end) in enumerate(zip(char_starts, ends, strict=True)):
        if i:
            ids.append(later[i - 1])
            labels.append(tok.advance_id)
        ids += code_ids[start:end].tolist()
        labels += code_ids[start:end].tolist()
    return _ids(ids, [tok.speech_end_id]), _ids(labels, [tok.speech_end_id])


def spoken_lengths(tok: SpeechTokenizer, shards: CodeShards) -> np.ndarray:
    """int64 [len(shards)]: how many letters or phonemes an interleaved tokenizer says of each utterance, at
    the shards' timings; 0 where it cannot say it (the aligner did not read it, or what the tokenizer says
    of its text does not fit its codes). From the shards' rows alone: no codes are read."""
    timings = (tok.spoken_timings(row["text"], row.get("char_starts"), row["length"]) for row in shards.rows)
    return np.array([len(starts or []) for starts in timings], np.int64)


def speakable_rows(tok: SpeechTokenizer, shards: CodeShards) -> np.ndarray:
    """bool [len(shards)]: which utterances the tts format can say: all of them in the plain format, those
    with spoken timings (`spoken_lengths`) in the interleaved one."""
    return spoken_lengths(tok, shards) > 0 if tok.interleaved else np.ones(len(shards), bool)


def phrase_example(tok: SpeechTokenizer, utterance: CodedUtterance, words: int,
                   rng: np.random.Generator) -> Example:
    """`words` consecutive words of the utterance (fewer if it has fewer) and their codes, in the tts format,
    from a random start; the whole utterance when it has no word cuts."""
    if utterance.word_cuts is None:
        return tts_sequence(tok, utterance.text, utterance.codes)
    all_words, cuts = utterance.text.split(), utterance.word_cuts
    words = min(words, len(all_words))
    start = int(rng.integers(len(all_words) - words + 1))
    codes = utterance.codes[cuts[start]: cuts[start + words]]
    if len(codes) == 0:  # only words the aligner could not read (numbers, dashes): say the whole utterance
        return tts_sequence(tok, utterance.text, utterance.codes)
    return tts_sequence(tok, " ".join(all_words[start: start + words]), codes)


def continuation_example(tok: SpeechTokenizer, codes: np.ndarray) -> Example:
    """Codes alone between speech markers: the acoustic language model (any speech, no transcript needed)."""
    speech = _ids(tok.code_to_token(np.asarray(codes)), [tok.speech_end_id])
    input_ids = _ids([tok.bos_id, tok.speech_start_id], speech, [tok.eos_id])
    labels = np.full_like(input_ids, IGNORE)
    labels[2: 2 + len(speech)] = speech
    return Example(input_ids, labels)


def unconditional_prompt(tok: SpeechTokenizer, prompt: np.ndarray) -> np.ndarray:
    """The continuation format's start for a tts_prompt: [bos] [speech_start] and the prompt's voice codes,
    without any text. What the model would say here is what classifier-free guidance steers away from
    (voxlm.speechlm.generate); pretraining's continuation source is where the model learned it."""
    prompt = np.asarray(prompt)
    return _ids([tok.bos_id, tok.speech_start_id], prompt[tok.is_code(prompt)])


def text_example(tok: SpeechTokenizer, text: str) -> Example:
    """Plain text: keeps (or, from scratch, builds) the text language model the TTS format reads with."""
    input_ids = _ids([tok.bos_id], tok.encode_text(text.strip()), [tok.eos_id])
    labels = input_ids.copy()
    labels[0] = IGNORE
    return Example(input_ids, labels)


class MixtureSampler:
    """Draws example kinds with probabilities proportional to `weights`; the same seed, the same draws."""

    def __init__(self, weights: Mapping[str, float], seed: int | Sequence[int]) -> None:
        unknown = set(weights) - set(SOURCES)
        if unknown:
            raise ValueError(f"unknown mixture sources {sorted(unknown)}; known: {list(SOURCES)}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {dict(weights)}")
        self.names = list(weights)
        self.probs = np.array([float(weights[n]) for n in self.names]) / sum(weights.values())
        self.rng = np.random.default_rng(seed)

    def sample(self) -> str:
        return self.names[self.rng.choice(len(self.names), p=self.probs)]

    def __iter__(self) -> Iterator[str]:
        while True:
            yield self.sample()


def pack(examples: Iterable[Example], seq_len: int, pad_id: int) -> Iterator[dict[str, np.ndarray]]:
    """Concatenate examples into one stream and cut it into rows of exactly seq_len (nanoGPT-style).

    Every token is kept: an example longer than what is left of a row continues in the next row, and the
    last row is padded (pad_id, labels IGNORE, attention_mask 0). A row's first label never carries loss
    under the model's shift, so one token per row boundary goes unpredicted; that is the only loss lost.
    Attention: rows use the plain causal mask, so an example attends to the examples before it in its row,
    as in GPT/Llama pretraining; [bos] starts each example and never carries loss, so no loss is ever put on
    predicting across a boundary. No varlen kernels or block masks are needed.
    """
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    buffered = 0
    for example in examples:
        ids.append(example.input_ids)
        labels.append(example.labels)
        buffered += len(example)
        if buffered < seq_len:
            continue
        stream_ids, stream_labels = np.concatenate(ids), np.concatenate(labels)
        full = buffered // seq_len * seq_len
        for start in range(0, full, seq_len):
            end = start + seq_len
            yield _row(stream_ids[start:end], stream_labels[start:end], seq_len, pad_id)
        ids, labels = [stream_ids[full:]], [stream_labels[full:]]
        buffered -= full
    if buffered:
        yield _row(np.concatenate(ids), np.concatenate(labels), seq_len, pad_id)


def _row(ids: np.ndarray, labels: np.ndarray, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    n = len(ids)
    row = {"input_ids": np.full(seq_len, pad_id, np.int64), "labels": np.full(seq_len, IGNORE, np.int64),
           "attention_mask": np.zeros(seq_len, np.int64)}
    row["input_ids"][:n], row["labels"][:n], row["attention_mask"][:n] = ids, labels, 1
    return row


def _stream_seed(seed: int) -> list[int]:
    """Distinct streams per DDP rank and dataloader worker, all fixed by the seed."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    worker = get_worker_info()
    return [seed, rank, worker.id if worker is not None else 0]


class PretrainDataset(IterableDataset):
    """An endless stream of packed rows drawn from the mixture over one split's code shards.

    `texts` feeds the "text" source (default: the shards' transcripts); utterances are drawn uniformly
    with replacement, so the stream has no epochs and the trainer's max_steps ends it. A "phrase" has
    `phrase_words` (min, max) words, drawn uniformly.
    """

    def __init__(self, shards: CodeShards, tok: SpeechTokenizer, weights: Mapping[str, float], seq_len: int,
                 seed: int = 0, texts: Sequence[str] | None = None,
                 phrase_words: Sequence[int] = (1, 4)) -> None:
        super().__init__()
        if shards.codebook_size != tok.codebook_size:
            raise ValueError(f"shards have {shards.codebook_size} codes, the tokenizer {tok.codebook_size}")
        MixtureSampler(weights, seed)  # fail on bad weights now, not inside a dataloader worker
        if len(phrase_words) != 2 or not 1 <= phrase_words[0] <= phrase_words[1]:
            raise ValueError(f"phrase_words is [min, max] words per phrase, 1 <= min <= max; got "
                             f"{list(phrase_words)}")
        if tok.interleaved:
            check_alphabet(shards, tok)
            if weights.get("phrase", 0) > 0:
                raise ValueError("phrases are for the plain format: in the interleaved format every "
                                 "character already sits at its speech; set the phrase weight to 0")
        if weights.get("phrase", 0) > 0 and not any("word_cuts" in row for row in shards.rows):
            raise ValueError("the mixture asks for phrases but the code shards hold no word timings: "
                             "re-run `python train.py stage=tokenize` with a codec trained with its CTC "
                             "head (loss weight ctc > 0), or set the phrase weight to 0")
        self.phrase_words = (int(phrase_words[0]), int(phrase_words[1]))
        self.shards, self.tok, self.seq_len, self.seed = shards, tok, seq_len, seed
        self.weights = dict(weights)
        self.texts = list(texts) if texts is not None else [row["text"] for row in shards.rows]
        self.speakable = speakable_rows(tok, shards)

    def examples(self, seed: Sequence[int]) -> Iterator[Example]:
        sources = MixtureSampler(self.weights, list(seed))
        rng = np.random.default_rng([*seed, 1])
        for source in sources:
            if source == "text":
                yield text_example(self.tok, self.texts[rng.integers(len(self.texts))])
                continue
            index = int(rng.integers(len(self.shards)))
            utterance = self.shards[index]
            if source == "continuation":
                yield continuation_example(self.tok, utterance.codes)
            elif source == "phrase":
                words = int(rng.integers(self.phrase_words[0], self.phrase_words[1] + 1))
                yield phrase_example(self.tok, utterance, words, rng)
            elif not self.speakable[index]:  # interleaved, and the aligner could not read it
                yield continuation_example(self.tok, utterance.codes)
            else:
                yield tts_sequence(self.tok, utterance.text, utterance.codes,
                                   char_starts=utterance.char_starts)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for row in pack(self.examples(_stream_seed(self.seed)), self.seq_len, self.tok.pad_id):
            yield {name: torch.from_numpy(value) for name, value in row.items()}


class SFTDataset(Dataset):
    """TTS pairs with voice prompts: item k is one target utterance spoken after another utterance of the
    same speaker (its transcript and codes), chosen by a generator seeded with (seed, target index).

    Sequences stay within max_len: targets too long even without a prompt are dropped; prompts are chosen
    among the speaker's utterances of at most max_prompt_frames codes that fit beside the target. A target
    whose speaker has no such utterance trains without a prompt (the text_speech format).
    """

    def __init__(self, shards: CodeShards, tok: SpeechTokenizer, seed: int = 0, max_len: int | None = None,
                 max_prompt_frames: int | None = None) -> None:
        if shards.codebook_size != tok.codebook_size:
            raise ValueError(f"shards have {shards.codebook_size} codes, the tokenizer {tok.codebook_size}")
        self.shards, self.tok, self.seed = shards, tok, seed
        self.max_len = max_len or np.iinfo(np.int64).max
        texts = [row["text"] for row in shards.rows]
        encoded = tok.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        self.text_len = np.array([len(ids) for ids in encoded], np.int64)
        self.frames = np.array([row["length"] for row in shards.rows], np.int64)
        if tok.interleaved:
            check_alphabet(shards, tok)
            # Each spoken character adds a token; a voice prompt is its codes between 2 markers, no text.
            chars = spoken_lengths(tok, shards)
            usable = chars > 0
            self.own_len = self.text_len + self.frames + chars + 6
            self.prompt_len = self.frames + 2
        else:
            # 6 markers (bos, text_start/end, speech_start/end, eos) + 1 for the space that joins a prompt's
            # transcript; a joined text that still comes out longer drops its prompt in __getitem__.
            self.own_len = self.text_len + self.frames + 7
            self.prompt_len = self.text_len + self.frames
            usable = np.ones(len(shards), bool)
        self.targets = np.flatnonzero((self.own_len <= self.max_len) & usable)
        if (~usable).any():
            log.warning("SFT: %d of %d utterances have no character timings (or more phonemes than codes) "
                        "and are skipped",
                        int((~usable).sum()), len(shards))
        if (self.own_len > self.max_len).any():
            log.warning("SFT: %d of %d utterances exceed max_len=%s and are skipped",
                        int((self.own_len > self.max_len).sum()), len(shards), max_len)
        prompt_ok = self.frames <= (max_prompt_frames or np.iinfo(np.int64).max)
        self.speakers = np.array([row["speaker"] for row in shards.rows])
        self.speaker_utterances = {
            s: np.flatnonzero((self.speakers == s) & prompt_ok) for s in np.unique(self.speakers)}

    def __len__(self) -> int:
        return len(self.targets)

    def prompt_index(self, k: int) -> int | None:
        """The shard index of item k's voice prompt, or None when no utterance of its speaker fits."""
        i = int(self.targets[k])
        candidates = self.speaker_utterances[self.speakers[i]]
        fits = (candidates != i) & (self.own_len[i] + self.prompt_len[candidates] <= self.max_len)
        candidates = candidates[fits]
        if not len(candidates):
            return None
        return int(np.random.default_rng([self.seed, i]).choice(candidates))

    def __getitem__(self, k: int) -> dict[str, Any]:
        target = self.shards[int(self.targets[k])]
        p = self.prompt_index(k)
        prompt = self.shards[p] if p is not None else None
        starts = target.char_starts
        if prompt is not None:
            example = tts_sequence(self.tok, target.text, target.codes, prompt.text, prompt.codes, starts)
        if prompt is None or len(example) > self.max_len:  # joined text came out longer than estimated
            example, prompt = tts_sequence(self.tok, target.text, target.codes, char_starts=starts), None
        return {"input_ids": example.input_ids, "labels": example.labels, "id": target.id,
                "prompt_id": prompt.id if prompt is not None else None}


def check_alphabet(shards: CodeShards, tok: SpeechTokenizer) -> None:
    """The interleaved format reads the shards' character timings: they must count the tokenizer's
    characters."""
    if shards.meta.get("alphabet") != tok.layout.spoken_alphabet:
        raise ValueError(
            f"the tokenizer speaks the characters {tok.layout.spoken_alphabet!r}, but the code shards in "
            f"{shards.split_dir} hold character timings for {shards.meta.get('alphabet')!r}: train on shards "
            "tokenized by the codec whose CTC alphabet the tokenizer took, or re-run `python train.py "
            "stage=tokenize` with a codec trained with its CTC head (loss weight ctc > 0)")


def pad_collate(batch: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest item: input_ids with pad_id, labels with IGNORE, attention_mask 0 there.
    Other keys (ids of the utterances) come through as lists."""
    longest = max(len(item["input_ids"]) for item in batch)
    out: dict[str, Any] = {
        "input_ids": torch.full((len(batch), longest), pad_id, dtype=torch.long),
        "labels": torch.full((len(batch), longest), IGNORE, dtype=torch.long),
        "attention_mask": torch.zeros(len(batch), longest, dtype=torch.long),
    }
    for b, item in enumerate(batch):
        n = len(item["input_ids"])
        out["input_ids"][b, :n] = torch.as_tensor(item["input_ids"])
        out["labels"][b, :n] = torch.as_tensor(item["labels"])
        out["attention_mask"][b, :n] = 1
    for key in batch[0].keys() - out.keys():
        out[key] = [item[key] for item in batch]
    return out

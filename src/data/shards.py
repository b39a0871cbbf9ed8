"""Code shards: what the tokenize stage writes and the SpeechLM stages read.

One folder per split:
    <root>/<split>/codes-00000.bin   int32 codes of many utterances back to back (memory-mapped to read)
    <root>/<split>/index.jsonl       a line per utterance: id, text, speaker, duration, shard, offset, length,
                                     and word_cuts + char_starts where the codec could align the text
                                     (voxlm.codec.align)
    <root>/<split>/meta.json         codec facts (codebook size, frame rate, sample rate, checkpoint, the CTC
                                     alphabet char_starts count in) + counts
A shard file is closed when it reaches `max_codes_per_shard`, so a large corpus stays in files of bounded
size. meta.json is written last: a split without it was interrupted and is rebuilt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CODE_DTYPE = np.int32


@dataclass(frozen=True)
class CodedUtterance:
    id: str
    codes: np.ndarray  # int32 [frames], a read-only view into the memory map
    text: str
    speaker: str
    duration: float
    word_cuts: list[int] | None = None  # word i of text.split() is codes[cuts[i]:cuts[i + 1]]
    # Character i of spoken_characters(text, meta["alphabet"]) is codes[starts[i]:starts[i + 1]] (the last
    # one runs to the end).
    char_starts: list[int] | None = None


class ShardWriter:
    """Appends utterances' codes to a split folder; `close(meta)` makes the split complete."""

    def __init__(self, split_dir: str | Path, max_codes_per_shard: int = 1 << 28) -> None:
        self.split_dir = Path(split_dir)
        self.split_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*self.split_dir.glob("codes-*.bin"), self.split_dir / "index.jsonl",
                      self.split_dir / "meta.json"]:
            stale.unlink(missing_ok=True)
        self.max_codes_per_shard = max_codes_per_shard
        self.index = open(self.split_dir / "index.jsonl", "w")  # noqa: SIM115 (closed in close())
        self.shard = -1
        self.shard_file = None
        self.shard_codes = 0
        self.num_utterances = 0
        self.num_codes = 0
        self.ids: set[str] = set()

    def _next_shard(self) -> None:
        if self.shard_file is not None:
            self.shard_file.close()
        self.shard += 1
        self.shard_file = open(self.split_dir / f"codes-{self.shard:05d}.bin", "wb")  # noqa: SIM115
        self.shard_codes = 0

    def add(self, id: str, codes: np.ndarray, text: str, speaker: str, duration: float,
            word_cuts: list[int] | None = None, char_starts: list[int] | None = None) -> None:
        codes = np.asarray(codes)
        if codes.ndim != 1 or codes.size == 0:
            raise ValueError(f"utterance {id}: expected a non-empty 1-D code array, got shape {codes.shape}")
        if id in self.ids:
            raise ValueError(f"utterance id {id!r} appears twice in {self.split_dir}")
        self.ids.add(id)
        if self.shard_file is None or self.shard_codes + codes.size > self.max_codes_per_shard:
            self._next_shard()
        self.shard_file.write(codes.astype(CODE_DTYPE).tobytes())
        row = {"id": id, "text": text, "speaker": speaker, "duration": round(float(duration), 4),
               "shard": self.shard, "offset": self.shard_codes, "length": int(codes.size)}
        if word_cuts is not None:
            if len(word_cuts) != len(text.split()) + 1 or word_cuts[0] != 0 or word_cuts[-1] != codes.size:
                raise ValueError(f"utterance {id}: word_cuts must be len(words) + 1 cuts from 0 to the "
                                 f"{codes.size} codes, got {word_cuts}")
            row["word_cuts"] = [int(c) for c in word_cuts]
        if char_starts is not None:
            starts = np.asarray(char_starts)
            if not len(starts) or starts[0] != 0 or (np.diff(starts) < 0).any() or starts[-1] >= codes.size:
                raise ValueError(f"utterance {id}: char_starts must be non-decreasing frames from 0, each "
                                 f"below the {codes.size} codes, got {list(char_starts)}")
            row["char_starts"] = [int(c) for c in char_starts]
        self.index.write(json.dumps(row) + "\n")
        self.shard_codes += codes.size
        self.num_codes += codes.size
        self.num_utterances += 1

    def close(self, meta: dict[str, Any]) -> dict[str, Any]:
        if self.shard_file is not None:
            self.shard_file.close()
        self.index.close()
        meta = {**meta, "num_utterances": self.num_utterances, "num_codes": self.num_codes,
                "num_shards": self.shard + 1, "dtype": np.dtype(CODE_DTYPE).name}
        (self.split_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return meta


class CodeShards:
    """Read-only random access to a split's coded utterances through memory maps."""

    def __init__(self, split_dir: str | Path) -> None:
        self.split_dir = Path(split_dir)
        meta_path = self.split_dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"{self.split_dir} holds no complete code shards (no meta.json): "
                "run `python train.py stage=tokenize` first, or re-run it if it was interrupted")
        self.meta = json.loads(meta_path.read_text())
        with open(self.split_dir / "index.jsonl") as f:
            self.rows = [json.loads(line) for line in f]
        self.shards = [
            np.memmap(self.split_dir / f"codes-{i:05d}.bin", dtype=CODE_DTYPE, mode="r")
            if (self.split_dir / f"codes-{i:05d}.bin").stat().st_size else np.zeros(0, CODE_DTYPE)
            for i in range(self.meta["num_shards"])
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> CodedUtterance:
        row = self.rows[i]
        codes = self.shards[row["shard"]][row["offset"]: row["offset"] + row["length"]]
        return CodedUtterance(row["id"], codes, row["text"], row["speaker"], row["duration"],
                              row.get("word_cuts"), row.get("char_starts"))

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    @property
    def frame_rate(self) -> float:
        return float(self.meta["frame_rate"])

    @property
    def codec_id(self) -> str | None:
        """Codec.code_fingerprint of the codec that made these codes (None: tokenized before shards named it)."""
        return self.meta.get("codec_id")

    def speakers(self) -> list[str]:
        return sorted({row["speaker"] for row in self.rows})


def is_complete(split_dir: str | Path) -> bool:
    """True when a split's shards were fully written (a resumed tokenize stage skips it)."""
    return (Path(split_dir) / "meta.json").exists()

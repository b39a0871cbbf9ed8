"""SpeechLM training throughput without a trained codec: inputs for `train.py stage=pretrain`, a timed run
of it, and its summary.

    python scripts/bench_train.py shards --source runs/tokenize/quickstart/shards --out RUNS/tokenize/NAME \
        [--codebook-size 65536] [--frame-rate 50] [--text-out TEXT.txt --text-lines 20000]
    python scripts/bench_train.py run --timing T.json [--warmup-steps 5] [--no-save] -- stage=pretrain ... \
        paths.runs_dir=RUNS stage.tokenize_run=NAME [speechlm.pretrain.text_corpus=TEXT.txt ...]
    python scripts/bench_train.py summarize --run RUNS/pretrain/RUN --timing T.json [--out bench.json]

`shards` writes code shards in the tokenize stage's format (voxlm.data.shards: int32 memmaps + index.jsonl +
meta.json) for the train and val splits of an existing tokenize run: the same utterances, transcripts,
speakers and durations, but uniformly random codes of another codebook at another frame rate, so that the
base preset (65,536 codes at 50 codes/s) can be trained when no base codec exists. Throughput does not
depend on what the codes are, only on the vocabulary (the model's shape) and the packed row length.

`--text-out` writes lines of random lowercase words for `speechlm.pretrain.text_corpus`: the pretrain
stage trains its byte-level BPE on the transcripts plus that text, and real transcripts alone hold too few
distinct words to reach a Llama-3-sized text vocabulary (`speechlm.tokenizer.vocab_size=128254`: + bos, eos,
pad, 6 control tokens and 65,536 codes = 193,799 rows, padded to 193,856 like the base preset's Llama 3
vocabulary). The text source of the pretraining mixture then reads those words: rows stay packed full.

`run` is `python train.py <args>` (the same hydra entry point, config and code) with one observer added to
the Trainer's callbacks: it records the wall time and tokens at every optimizer step, synchronizing the GPU
at the end of the warm-up steps and at the last step, and the peak GPU memory, into --timing (also when the
run fails, e.g. out of memory). `--no-save` skips what comes after training (last.ckpt, ~15 GB for the base
preset with AdamW state, and hf/): metrics.json is still written, without hf/.

`summarize` reports the steady-state throughput (tokens between the end of the warm-up steps and the last
step over the wall time between them) next to the whole run's (metrics.json's tokens_per_s: every step, the
first one included, as docs/benchmarks.md's CPU table reports), with the run's shape and vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

SPLITS = ("train", "val")


def make_shards(source: Path, out: Path, codebook_size: int, frame_rate: float, seed: int) -> dict:
    from voxlm.data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    made = {}
    for split in SPLITS:
        lines = (source / split / "index.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if line]
        source_meta = json.loads((source / split / "meta.json").read_text())
        writer = ShardWriter(out / "shards" / split)
        for row in rows:
            frames = max(1, round(float(row["duration"]) * frame_rate))
            codes = rng.integers(0, codebook_size, frames, dtype=np.int64)
            writer.add(row["id"], codes, row["text"], row["speaker"], row["duration"])
        meta = writer.close({
            "codec_run": None, "codebook_size": codebook_size, "frame_rate": frame_rate,
            "sample_rate": source_meta.get("sample_rate", 16000),
            "hop_length": int(round(source_meta.get("sample_rate", 16000) / frame_rate)),
            "split": split, "synthetic": f"uniformly random codes (seed {seed}) over the utterances, "
                                         f"transcripts and durations of {source / split}"})
        made[split] = {"utterances": meta["num_utterances"], "codes": meta["num_codes"]}
    (out / "metrics.json").write_text(json.dumps({"synthetic_shards": made}, indent=2) + "\n")
    return made


def make_text(path: Path, lines: int, words_per_line: int, seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    with open(path, "w") as f:
        for _ in range(lines):
            lengths = rng.integers(4, 13, words_per_line)
            f.write(" ".join("".join(rng.choice(letters, n)) for n in lengths) + "\n")


class StepTimer(L.Callback):
    """Wall time and tokens at each optimizer step, and peak GPU memory; written to `path` at the end of
    training or on an exception."""

    def __init__(self, path: Path, warmup_steps: int) -> None:
        self.path, self.warmup = Path(path), warmup_steps
        self.steps: list[dict] = []
        self.tokens, self.seen_step, self.start = 0, 0, None
        self.marks: dict[str, dict] = {}

    def _sync(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_start(self, trainer, pl_module) -> None:
        self._sync(trainer)
        self.start = time.perf_counter()
        self.seen_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += int(getattr(pl_module, "_batch_tokens", 0))
        step = trainer.global_step
        if step == self.seen_step:
            return  # a micro-batch inside gradient accumulation
        self.seen_step = step
        synced = step == self.warmup or step >= trainer.max_steps > 0
        if synced:
            self._sync(trainer)
        now = time.perf_counter() - self.start
        self.steps.append({"step": step, "seconds": round(now, 4), "tokens": self.tokens})
        if synced:
            self.marks["warmup_end" if step == self.warmup else "last"] = self.steps[-1]

    def _write(self, trainer, error: str | None) -> None:
        info = {"device": str(trainer.strategy.root_device), "warmup_steps": self.warmup,
                "steps": self.steps, "marks": self.marks, "error": error,
                "max_steps": trainer.max_steps,
                "accumulate_grad_batches": trainer.accumulate_grad_batches}
        if trainer.strategy.root_device.type == "cuda":
            device = trainer.strategy.root_device
            total = torch.cuda.get_device_properties(device).total_memory
            info |= {"gpu": torch.cuda.get_device_name(device), "gpu_memory_total_gib": total / 2**30,
                     "max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                     "max_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(info, indent=2) + "\n")

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, None)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._write(trainer, f"{type(exception).__name__}: {str(exception)[:500]}")


def run_training(train_args: list[str], timing: Path, warmup_steps: int, no_save: bool) -> None:
    """`python train.py <train_args>` in this process, with the StepTimer among the Trainer's callbacks."""
    import runpy

    from voxlm.runs import write_metrics
    from voxlm.speechlm import stage

    timer = StepTimer(timing, warmup_steps)
    build_trainer = stage.build_trainer

    def build_timed_trainer(cfg, run_dir, callbacks=None):
        return build_trainer(cfg, run_dir, [*(callbacks or []), timer])

    stage.build_trainer = build_timed_trainer
    if no_save:
        def finish_without_saving(trainer, module, tok, run_dir, extra) -> None:
            summary = module.training_summary()
            write_metrics(run_dir, {**summary, **extra, "steps": trainer.global_step, "hf": None,
                                    "saved": False,
                                    "parameters": sum(p.numel() for p in module.model.parameters())})

        L.Trainer.save_checkpoint = lambda self, *args, **kwargs: None
        stage.finish = finish_without_saving
    # As `python train.py ...`: its argument checks, then its hydra main (which finds configs/ beside it).
    entry = Path(__file__).resolve().parents[1] / "train.py"
    sys.argv = [str(entry), *train_args]
    runpy.run_path(str(entry), run_name="__main__")


def summarize(run: Path, timing_path: Path | None) -> dict:
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    config = {}
    if (run / "config.yaml").exists():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    recipe = config.get("speechlm", {}).get("pretrain", {})
    model_cfg = config.get("speechlm", {}).get("model", {})
    micro_batch, seq_len = int(recipe.get("batch_size", 0)), int(recipe.get("seq_len", 0))
    accumulate = int(recipe.get("accumulate_grad_batches", 1))
    timing = json.loads(timing_path.read_text()) if timing_path and timing_path.exists() else {}
    marks = timing.get("marks", {})
    steady = None
    if "warmup_end" in marks and "last" in marks:
        start, end = marks["warmup_end"], marks["last"]
        if end["seconds"] > start["seconds"]:
            steady = {"steps": end["step"] - start["step"], "tokens": end["tokens"] - start["tokens"],
                      "seconds": round(end["seconds"] - start["seconds"], 4)}
            steady["tokens_per_s"] = steady["tokens"] / steady["seconds"]
            steady["seconds_per_step"] = steady["seconds"] / max(steady["steps"], 1)
    steps = timing.get("steps", [])
    step_seconds = [b["seconds"] - a["seconds"] for a, b in zip(steps, steps[1:], strict=False)]
    layout_file = run / "tokenizer" / "speech_layout.json"
    layout = json.loads(layout_file.read_text()) if layout_file.exists() else {}
    vocab = (layout.get("code_offset", 0) + layout.get("codebook_size", 0)) or None
    multiple = model_cfg.get("pad_vocab_to_multiple_of")
    summary = {
        "run": str(run), "error": timing.get("error"),
        "device": timing.get("gpu") or timing.get("device"),
        "micro_batch": micro_batch, "accumulate_grad_batches": accumulate, "seq_len": seq_len,
        "tokens_per_optimizer_step": micro_batch * accumulate * seq_len,
        "optimizer_steps": metrics.get("steps", metrics.get("global_step")),
        "warmup_steps_excluded": timing.get("warmup_steps"),
        "steady": steady,
        "steady_tokens_per_s": steady["tokens_per_s"] if steady else None,
        "step_seconds_median_after_warmup": (sorted(step_seconds[timing.get("warmup_steps", 0):])[
            len(step_seconds[timing.get("warmup_steps", 0):]) // 2] if len(step_seconds) >
            timing.get("warmup_steps", 0) else None),
        "run_tokens_per_s": metrics.get("tokens_per_s"),
        "run_tokens_seen": metrics.get("tokens_seen"), "run_train_seconds": metrics.get("train_seconds"),
        "train_loss_first": metrics.get("train_loss_first"), "train_loss_last": metrics.get("train/loss"),
        "parameters": metrics.get("parameters"),
        "tokenizer_vocab": vocab,
        "model_vocab": (-(-vocab // multiple) * multiple if vocab and multiple else vocab),
        "text_vocab_size": layout.get("text_vocab_size"), "codebook_size": layout.get("codebook_size"),
        "model": {key: model_cfg.get(key) for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                       "num_attention_heads", "num_key_value_heads",
                                                       "head_dim", "tie_word_embeddings",
                                                       "attn_implementation")},
        "precision": config.get("trainer", {}).get("precision"),
        "memory_gib": {key: round(timing[key], 2) for key in (
            "gpu_memory_total_gib", "max_memory_allocated_gib", "max_memory_reserved_gib") if key in timing},
    }
    if summary["parameters"] and summary["steady_tokens_per_s"]:
        # 6 N per token for the matmuls (the tied embedding counts once, as the output layer) + causal
        # attention's 6 L T d (half of 12 L T d).
        n, layers = summary["parameters"], int(model_cfg.get("num_hidden_layers") or 0)
        width = int(model_cfg.get("num_attention_heads") or 0) * int(model_cfg.get("head_dim") or 0)
        per_token = 6 * n + 6 * layers * seq_len * width
        summary["model_tflops_per_s"] = per_token * summary["steady_tokens_per_s"] / 1e12
    return summary


def markdown(summary: dict, command: str | None, data: str | None) -> str:
    def fmt(value: float | None, digits: int = 0) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else \
            f"{value:,.{digits}f}"

    steady = summary.get("steady") or {}
    lines = [f"device: {summary.get('device')}; precision {summary.get('precision')}; peak memory "
             f"{summary['memory_gib']}", "",
             "| preset | params | vocab | rows x tokens per optimizer step | steady tokens/s | "
             "whole-run tokens/s | s/step (steady) | model TFLOP/s |",
             "|---|---:|---:|---|---:|---:|---:|---:|",
             f"| base | {fmt((summary['parameters'] or 0) / 1e6, 1)}M | {fmt(summary['model_vocab'])} | "
             f"{summary['micro_batch']} x {summary['accumulate_grad_batches']} (accum.) x "
             f"{summary['seq_len']} | "
             f"{fmt(summary['steady_tokens_per_s'])} | {fmt(summary['run_tokens_per_s'])} | "
             f"{fmt(steady.get('seconds_per_step'), 3)} | {fmt(summary.get('model_tflops_per_s'), 1)} |"]
    if summary.get("error"):
        lines += ["", f"error: {summary['error']}"]
    if command:
        lines += ["", f"command: `{command}`"]
    if data:
        lines += ["", f"data: {data}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    shards = sub.add_parser("shards", help="random-code shards over an existing tokenize run's utterances")
    shards.add_argument("--source", required=True, help="a tokenize run's shards/ folder (train/, val/)")
    shards.add_argument("--out", required=True, help="the new tokenize run folder (shards/ goes inside)")
    shards.add_argument("--codebook-size", type=int, default=65536)
    shards.add_argument("--frame-rate", type=float, default=50.0)
    shards.add_argument("--seed", type=int, default=0)
    shards.add_argument("--text-out", default=None, help="also write random-word lines for text_corpus")
    shards.add_argument("--text-lines", type=int, default=20000)
    shards.add_argument("--words-per-line", type=int, default=12)
    run = sub.add_parser("run", help="train.py with a step timer; train.py's arguments after --")
    run.add_argument("--timing", required=True, help="where the step timer writes its JSON")
    run.add_argument("--warmup-steps", type=int, default=5)
    run.add_argument("--no-save", action="store_true", help="skip last.ckpt and hf/ after training")
    run.add_argument("train_args", nargs=argparse.REMAINDER)
    summary = sub.add_parser("summarize", help="throughput of a finished pretrain run")
    summary.add_argument("--run", required=True)
    summary.add_argument("--timing", default=None, help="the step timer's JSON (bench_train.py run)")
    summary.add_argument("--command-line", default=None, help="the train command, for the record")
    summary.add_argument("--data", default=None, help="what the run trained on, for the record")
    summary.add_argument("--out", default=None, help="write JSON here and markdown beside it (.md)")
    args = parser.parse_args()

    if args.command == "shards":
        made = make_shards(Path(args.source), Path(args.out), args.codebook_size, args.frame_rate, args.seed)
        if args.text_out:
            make_text(Path(args.text_out), args.text_lines, args.words_per_line, args.seed)
        print(json.dumps({"out": args.out, "codebook_size": args.codebook_size, "frame_rate": args.frame_rate,
                          **made}))
        return
    if args.command == "run":
        train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
        run_training(train_args, Path(args.timing), args.warmup_steps, args.no_save)
        return
    result = summarize(Path(args.run), Path(args.timing) if args.timing else None)
    result["command"], result["data"] = args.command_line, args.data
    table = markdown(result, args.command_line, args.data)
    print(json.dumps(result, indent=2))
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(table)
    if result["steady_tokens_per_s"] is None and result["run_tokens_per_s"] is None:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""`python train.py stage=rlhf algorithm=grpo|dpo`: align an SFT SpeechLM with audio rewards through TRL.

Reads the SFT run named by cfg.stage.sft_run (its hf/ folder) and the codec run cfg.stage.codec_run. Prompts
are built as in SFT: a target sentence from cfg.stage.prompts.split, after a voice prompt (another recording
of the same speaker: its transcript and codec codes). Rewards: voxlm.rlhf.rewards (intelligibility, speaker
similarity, DNSMOS, weighted by cfg.stage.rewards).

- grpo: trl's GRPOTrainer samples `num_generations` completions per prompt from the policy and moves it
  toward the better ones of each group, with a KL penalty (beta) to the SFT model. An interleaved SpeechLM's
  rollouts come from voxlm's sampler (`FeedCharacters`, TRL's rollout_func), which feeds each character
  where the model says <|advance|>; the fed characters are masked out of the loss (TRL's env_mask).
- dpo: N candidates per prompt are sampled from the SFT model (voxlm's sampler, as synth and eval draw) and
  ranked by the same rewards; the best and the worst (when their rewards differ by at least min_reward_gap)
  make a preference pair for trl's DPOTrainer, as the token ids the model read. The pairs are saved in the
  run folder (preferences.jsonl) and reused when the run resumes.

For an interleaved SpeechLM both count the tokens it chose (codes, [speech_end], and a lookahead's
<|advance|>) and leave out each character that generation fed where the model said <|advance|>, since at
that position the model chose <|advance|>, not the character (TRL scores the token that follows, so the
moves themselves go unscored).

Writes into runs/rlhf/<run_name>/: checkpoints/ (trainer checkpoints: the same run name resumes), hf/ (the
aligned model + tokenizer, what synth, eval, export and serving load) and metrics.json (reward components,
invalid completions by reason, steps). With stage.evaluate.enabled, the SFT model and the aligned one are then
scored on the same held-out sentences with the same seeds (voxlm.eval.tts_eval), and eval/comparison.md holds
both with bootstrap 95% intervals.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from omegaconf import DictConfig, OmegaConf
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from voxlm.codec.align import load_ctc_head
from voxlm.codec.module import load_codec
from voxlm.data.text import normalize_text
from voxlm.eval.report import markdown_table, write_json
from voxlm.eval.tts_eval import Case, Judges, build_cases, case_prompt, evaluate_tts
from voxlm.rlhf.rewards import COMPONENTS, SpeechRewards
from voxlm.runs import find_run, write_metrics
from voxlm.speechlm.generate import Generation, SamplingConfig, generate_codes
from voxlm.speechlm.model import load_speechlm, speechlm_codec, speechlm_folder
from voxlm.speechlm.sequences import generation_start
from voxlm.speechlm.tokenizer import SpeechTokenizer
from voxlm.training import seed_everything

log = logging.getLogger(__name__)

HF_DIR = "hf"
PREFERENCES_FILE = "preferences.jsonl"


def run_rlhf(cfg: DictConfig, run_dir: Path) -> None:
    seed_everything(cfg)
    stage, algorithm = cfg.stage, cfg.algorithm
    if algorithm.name not in ("grpo", "dpo"):
        raise ValueError(f"unknown algorithm '{algorithm.name}': use algorithm=grpo or algorithm=dpo")
    sft_dir = speechlm_folder(find_run(stage.sft_run, cfg.paths.runs_dir, "sft"))
    codec_dir = find_run(speechlm_codec(sft_dir, stage.codec_run, "latest"), cfg.paths.runs_dir, "codec")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    codec = load_codec(codec_dir, map_location=device)
    model, tok = load_speechlm(sft_dir, codec.codebook_size, device, codec_id=codec.code_fingerprint())
    judges = Judges.load(cfg.judges)

    cases = build_cases(cfg.data, stage.prompts.split, stage.prompts.split, codec.sample_rate,
                        int(stage.prompts.max_prompts), float(stage.prompts.max_prompt_seconds),
                        int(cfg.seed), float(stage.prompts.max_target_seconds), shuffle=True)
    prompts = [case_prompt(tok, codec, case) for case in cases]
    rewards = SpeechRewards(codec, tok, judges, {case.reference_id: case.reference_audio for case in cases},
                            stage.rewards, stage.length, load_ctc_head(codec_dir))
    log.info("%s on %s: %d prompts from %s", algorithm.name, sft_dir, len(cases), stage.prompts.split)
    started = time.perf_counter()
    trainer_cls = train_grpo if algorithm.name == "grpo" else train_dpo
    history = trainer_cls(cfg, run_dir, model, tok, codec, cases, prompts, rewards)
    seconds = time.perf_counter() - started

    hf_dir = run_dir / HF_DIR
    model.save_pretrained(str(hf_dir))
    tok.save_pretrained(hf_dir)
    write_metrics(run_dir, {"algorithm": algorithm.name, "sft_run": str(sft_dir), "codec_run": str(codec_dir),
                            "train_seconds": seconds, "prompts": len(cases), "hf": str(hf_dir),
                            "invalid_completions": rewards.invalid_counts(), "log_history": history})
    log.info("aligned SpeechLM written to %s (%.0f s); invalid completions: %s", hf_dir, seconds,
             rewards.invalid_counts())
    if stage.evaluate.enabled:
        compare(cfg, run_dir, sft_dir, hf_dir, codec_dir, judges)


def prompt_text(tok: SpeechTokenizer, ids: np.ndarray) -> str:
    """The prompt as the string TRL tokenizes; refuses one that would not tokenize back to the same ids."""
    text = tok.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    back = tok.tokenizer(text=[text], add_special_tokens=False)["input_ids"][0]
    if list(back) != ids.tolist():
        raise ValueError("the tokenizer does not read its own decoded prompt back to the same ids; TRL "
                         "tokenizes prompts from text, so it would train on different prompts")
    return text


def trainer_args(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """TrainingArguments shared by both algorithms."""
    algorithm = cfg.algorithm
    report_to = []
    logger_target = str(cfg.get("logger", {}).get("_target_", ""))
    if "Wandb" in logger_target:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_PROJECT", "voxlm")
        report_to = ["wandb"]
    cuda = torch.cuda.is_available()
    return {
        "output_dir": str(run_dir / "checkpoints"), "max_steps": int(algorithm.max_steps),
        "per_device_train_batch_size": int(algorithm.batch_size),
        "gradient_accumulation_steps": int(algorithm.accumulate_grad_batches),
        "learning_rate": float(algorithm.learning_rate), "lr_scheduler_type": str(algorithm.lr_scheduler),
        "warmup_steps": int(algorithm.warmup_steps), "max_grad_norm": float(algorithm.grad_clip),
        "beta": float(algorithm.beta), "logging_steps": 1, "save_steps": int(algorithm.save_steps),
        "save_total_limit": 2, "report_to": report_to, "run_name": f"rlhf-{cfg.run_name}",
        "seed": int(cfg.seed), "use_cpu": not cuda, "bf16": cuda and torch.cuda.is_bf16_supported(),
        "dataloader_num_workers": 0, "remove_unused_columns": False, "disable_tqdm": True,
    }


def latest_checkpoint(run_dir: Path) -> str | None:
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"),
                         key=lambda path: int(path.name.split("-")[1]))
    if not checkpoints:
        return None
    log.info("resuming from %s", checkpoints[-1])
    return str(checkpoints[-1])


def code_tokens_only(tok: SpeechTokenizer, vocab_size: int) -> list[int]:
    """Every id but the codes and [speech_end]: suppressed in sampling, as voxlm's own sampler does."""
    allowed = set(range(tok.code_offset, tok.vocab_size)) | {tok.speech_end_id}
    return [i for i in range(vocab_size) if i not in allowed]


def rollout_sampling(cfg: DictConfig) -> SamplingConfig:
    """stage.sampling for voxlm's sampler (GRPO rollouts of interleaved models, DPO candidates)."""
    settings = OmegaConf.to_container(cfg.stage.sampling)
    return SamplingConfig(**{key: value for key, value in settings.items() if key != "constrain_to_codes"})


class FeedCharacters:
    """GRPO rollouts of an interleaved SpeechLM (TRL's rollout_func): TRL's generate cannot feed the model
    its next character when it says <|advance|>, so voxlm's sampler makes them, from the policy being
    trained. Each completion is every token the model read; `env_mask` leaves the fed characters out of the
    loss, and the reward functions judge `speech_ids` (the codes and [speech_end]). TRL hands over each
    prompt `num_generations` times; `rows` maps each prompt string to its ids, spoken characters and length
    guard (`rollout_rows`)."""

    def __init__(self, model: torch.nn.Module, tok: SpeechTokenizer,
                 rows: dict[str, tuple[np.ndarray, list[int], int]], sampling: SamplingConfig) -> None:
        self.model, self.tok, self.rows, self.sampling = model, tok, rows, sampling
        self.fed = fed_character_mask(tok, model.config.vocab_size)
        self.calls = 0

    def __call__(self, prompts: list[str], trainer: GRPOTrainer | None = None) -> dict[str, Any]:
        rows = [self.rows[prompt] for prompt in prompts]
        seed = None if self.sampling.seed is None else self.sampling.seed + self.calls
        self.calls += 1  # every call draws afresh, as TRL's own sampling does
        training = self.model.training
        self.model.eval()
        # A limit one past the guard: a rollout that runs into it is over length, and scores 0.
        generation = generate_codes(self.model, self.tok, [ids for ids, _, _ in rows],
                                    [limit + 1 for _, _, limit in rows],
                                    SamplingConfig(**{**self.sampling.__dict__, "seed": seed}),
                                    spoken=[spoken for _, spoken, _ in rows])
        self.model.train(training)
        completions = [tokens.tolist() for tokens in generation.tokens]
        return {
            "prompt_ids": [generation_start(self.tok, ids, spoken)[0].tolist() for ids, spoken, _ in rows],
            "completion_ids": completions,
            "logprobs": None,  # TRL reads them only to correct vLLM's sampling; this sampler is the policy
            "env_mask": [(~self.fed[torch.tensor(ids, dtype=torch.long)]).long().tolist()
                         for ids in completions],
            "speech_ids": speech_ids(self.tok, generation),
        }


def rollout_rows(tok: SpeechTokenizer, texts: list[str], cases: list[Case], prompts: list[np.ndarray],
                 rewards: SpeechRewards) -> dict[str, tuple[np.ndarray, list[int], int]]:
    """Each GRPO prompt string (`texts`, as TRL passes them) -> its ids, spoken characters, length guard."""
    return {text: (ids, tok.spoken_char_ids(normalize_text(case.text)), rewards.max_frames(case.text))
            for text, ids, case in zip(texts, prompts, cases, strict=True)}


def speech_ids(tok: SpeechTokenizer, generation: Generation) -> list[list[int]]:
    """Each row's speech as the rewards read it: its code tokens, then [speech_end] unless it was cut off."""
    return [tok.code_to_token(codes.numpy()).tolist() + ([] if cut else [tok.speech_end_id])
            for codes, cut in zip(generation.codes, generation.truncated, strict=True)]


def train_grpo(cfg: DictConfig, run_dir: Path, model: torch.nn.Module, tok: SpeechTokenizer, codec: Any,
               cases: list[Case], prompts: list[np.ndarray], rewards: SpeechRewards) -> list[dict]:
    algorithm, sampling = cfg.algorithm, cfg.stage.sampling
    model.train()
    model.generation_config.eos_token_id = tok.speech_end_id  # TRL adds the tokenizer's eos to its stops
    texts = [prompt_text(tok, ids) for ids in prompts]
    dataset = Dataset.from_list([{"prompt": text, "text": case.text, "reference_id": case.reference_id}
                                 for text, case in zip(texts, cases, strict=True)])
    max_frames = max(rewards.max_frames(case.text) for case in cases)
    generation_kwargs = ({"suppress_tokens": code_tokens_only(tok, model.config.vocab_size)}
                         if sampling.constrain_to_codes else {})
    rollout = (FeedCharacters(model, tok, rollout_rows(tok, texts, cases, prompts, rewards),
                              rollout_sampling(cfg)) if tok.interleaved else None)
    args = GRPOConfig(
        **trainer_args(cfg, run_dir), num_generations=int(algorithm.num_generations),
        max_completion_length=max_frames + 1, temperature=float(sampling.temperature),
        top_k=int(sampling.top_k or 0), top_p=float(sampling.top_p),
        repetition_penalty=float(sampling.repetition_penalty), generation_kwargs=generation_kwargs,
        reward_weights=rewards.reward_weights(), scale_rewards=str(algorithm.scale_rewards),
        loss_type=str(algorithm.loss_type), mask_truncated_completions=False, log_completions=False,
        shuffle_dataset=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=rewards.reward_functions(), args=args,
                          train_dataset=dataset, processing_class=tok.tokenizer, rollout_func=rollout)
    trainer.train(resume_from_checkpoint=latest_checkpoint(run_dir))
    model.eval()
    return trainer.state.log_history


def sample_preferences(model: torch.nn.Module, tok: SpeechTokenizer, cases: list[Case],
                       prompts: list[np.ndarray], rewards: SpeechRewards,
                       cfg: DictConfig) -> list[dict[str, Any]]:
    """Best-vs-worst pairs among N sampled candidates per prompt, ranked by the weighted reward."""
    algorithm, sampling = cfg.algorithm, rollout_sampling(cfg)
    n = int(algorithm.num_generations)
    pairs, model = [], model.eval()
    for index, (case, ids) in enumerate(zip(cases, prompts, strict=True)):
        limit = rewards.max_frames(case.text)
        spoken = tok.spoken_char_ids(normalize_text(case.text)) if tok.interleaved else None
        # A limit one past the guard: a candidate that runs into it is over length, and ranked last.
        generation = generate_codes(model, tok, [ids] * n, limit + 1,
                                    SamplingConfig(**{**sampling.__dict__, "seed": int(cfg.seed) + index}),
                                    spoken=None if spoken is None else [spoken] * n)
        scores = rewards.score(speech_ids(tok, generation), [case.text] * n, [case.reference_id] * n)
        order = np.argsort(-scores["total"], kind="stable")
        best, worst = int(order[0]), int(order[-1])
        gap = float(scores["total"][best] - scores["total"][worst])
        if gap < float(algorithm.min_reward_gap) or not scores["valid"][best]:
            continue
        # What the model read: the prompt with an interleaved model's first characters, then its tokens.
        start = generation_start(tok, ids, spoken)[0].tolist()
        chosen, rejected = (generation.tokens[i].tolist() + [tok.eos_id] for i in (best, worst))
        pairs.append({
            "prompt_ids": start, "chosen_ids": chosen, "rejected_ids": rejected,
            **{key: tok.tokenizer.decode(value, skip_special_tokens=False)
               for key, value in (("prompt", start), ("chosen", chosen), ("rejected", rejected))},
            "id": case.id, "reward_chosen": float(scores["total"][best]),
            "reward_rejected": float(scores["total"][worst]),
            **{f"{name}_chosen": float(scores[name][best]) for name in COMPONENTS},
            **{f"{name}_rejected": float(scores[name][worst]) for name in COMPONENTS},
        })
    return pairs


def fed_character_mask(tok: SpeechTokenizer, vocab_size: int) -> torch.Tensor:
    """BoolTensor [vocab_size]: the spoken characters that generation feeds an interleaved model (none for
    a plain one). In a sampled completion they stand where the model chose <|advance|>."""
    fed = torch.zeros(vocab_size, dtype=torch.bool)
    fed[list(tok.char_ids.values())] = True
    return fed


class ScoreChosenTokens:
    """TRL's preference collator, with the fed characters left out of the completion mask, so DPO's
    log-probabilities count only the tokens the model chose."""

    def __init__(self, collate: DataCollatorForPreference, fed: torch.Tensor) -> None:
        self.collate, self.fed = collate, fed

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        batch["completion_mask"] = batch["completion_mask"] * ~self.fed[batch["input_ids"]]
        return batch


class PairsAsTokenIds(DPOTrainer):
    """DPOTrainer over pairs given as the token ids the model read, taken as they are. TRL would tokenize the
    pairs' text itself, and a byte-level BPE merges two characters fed one after the other into one token.
    (TRL's preparation also drops pairs whose prompt alone fills max_length: `train_dpo` does that here.)"""

    def _prepare_dataset(self, dataset: Dataset, *args: Any, **kwargs: Any) -> Dataset:
        return dataset


def train_dpo(cfg: DictConfig, run_dir: Path, model: torch.nn.Module, tok: SpeechTokenizer, codec: Any,
              cases: list[Case], prompts: list[np.ndarray], rewards: SpeechRewards) -> list[dict]:
    algorithm = cfg.algorithm
    path = run_dir / PREFERENCES_FILE
    if path.is_file():
        pairs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if pairs and "prompt_ids" not in pairs[0]:
            raise ValueError(f"{path} holds pairs as text only (written before voxlm kept their token ids): "
                             "delete it, and the run samples its pairs again")
        log.info("DPO: %d preference pairs from %s", len(pairs), path)
    else:
        pairs = sample_preferences(model, tok, cases, prompts, rewards, cfg)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
        tmp.replace(path)  # complete or absent: a resumed run never reads half a file
        log.info("DPO: %d preference pairs from %d prompts, written to %s", len(pairs), len(cases), path)
    fits = [pair for pair in pairs if len(pair["prompt_ids"]) < int(algorithm.max_length)]
    if len(fits) < len(pairs):
        log.warning("DPO: %d of %d pairs left out: their prompts alone fill algorithm.max_length=%d",
                    len(pairs) - len(fits), len(pairs), algorithm.max_length)
    pairs = fits
    if not pairs:
        raise ValueError("DPO: no prompt gave a valid best candidate whose reward beats the worst by "
                         f"algorithm.min_reward_gap={algorithm.min_reward_gap} (invalid candidates: "
                         f"{rewards.invalid_counts()}): lower the gap, sample more candidates "
                         "(num_generations), or start from a model that stops within the length guard")
    write_metrics(run_dir, {"preference_pairs": len(pairs), "reward_chosen_mean": float(
        np.mean([p["reward_chosen"] for p in pairs])), "reward_rejected_mean": float(
        np.mean([p["reward_rejected"] for p in pairs]))})
    dataset = Dataset.from_list([{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                 for p in pairs])
    model.train()
    args = DPOConfig(**trainer_args(cfg, run_dir), max_length=int(algorithm.max_length),
                     loss_type=[str(algorithm.loss_type)])
    collate = DataCollatorForPreference(pad_token_id=tok.pad_id, max_length=args.max_length,
                                        truncation_mode=args.truncation_mode)
    collator = ScoreChosenTokens(collate, fed_character_mask(tok, model.config.vocab_size))
    trainer = PairsAsTokenIds(model=model, args=args, train_dataset=dataset, processing_class=tok.tokenizer,
                              data_collator=collator)
    trainer.train(resume_from_checkpoint=latest_checkpoint(run_dir))
    model.eval()
    return trainer.state.log_history


def compare(cfg: DictConfig, run_dir: Path, sft_dir: Path, aligned_dir: Path, codec_dir: Path,
            judges: Judges) -> dict[str, Any]:
    """Score the SFT model and the aligned one on the same sentences, prompts and seeds."""
    results = {}
    for name, folder in (("sft", sft_dir), (cfg.algorithm.name, aligned_dir)):
        eval_cfg = OmegaConf.create({**OmegaConf.to_container(cfg.stage.evaluate, resolve=True),
                                     "speechlm_run": str(folder), "codec_run": str(codec_dir),
                                     "out": str(run_dir / "eval" / name)})
        results[name] = evaluate_tts(eval_cfg, cfg.data, judges)
    rows = {}
    for name, report in results.items():
        for condition, summary in report["conditions"].items():
            ci = report["intervals"][condition]
            rows[f"{condition}/{name}"] = {
                "n": summary["synth"]["n"], "wer": summary["synth"]["wer"],
                "utterance_wer [95% CI]": "{:.3f} [{:.3f}, {:.3f}]".format(*ci["utterance_wer"]),
                "speaker_sim [95% CI]": "{:.3f} [{:.3f}, {:.3f}]".format(*ci["speaker_sim"]),
                "dnsmos_ovrl [95% CI]": "{:.3f} [{:.3f}, {:.3f}]".format(*ci["dnsmos_ovrl"]),
                "truncated_share": summary["synth"]["truncated_share"],
            }
    text = (f"# {cfg.algorithm.name} vs SFT\n\nSFT {sft_dir}; aligned {aligned_dir}; same sentences, voice "
            "prompts and sampling seeds.\n\n" + markdown_table(rows) + "\n")
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval" / "comparison.md").write_text(text)
    write_json({name: {"conditions": report["conditions"], "intervals": report["intervals"]}
                for name, report in results.items()}, run_dir / "eval" / "comparison.json")
    write_metrics(run_dir, {"comparison": rows})
    log.info("comparison written to %s:\n%s", run_dir / "eval" / "comparison.md", text)
    return results

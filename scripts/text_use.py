"""Does a SpeechLM read its text? `python scripts/text_use.py RUN [RUN ...] [--shards DIR] [--count 40]`.

For each run (a SpeechLM run folder or save_pretrained folder): the mean next-token loss on the speech of
`count` utterances given their own transcript, another utterance's, or none (voxlm.eval.text_use), and the
paired gaps with their standard errors. Prints a markdown table; `--out FILE` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from voxlm.data.shards import CodeShards
from voxlm.eval.text_use import CONDITIONS, text_use
from voxlm.speechlm.model import load_speechlm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="SpeechLM run folders (or their hf/ folders)")
    parser.add_argument("--shards", default="runs/tokenize/quickstart/shards/val", help="a code shards split")
    parser.add_argument("--count", type=int, default=40, help="utterances (drawn with --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    shards = CodeShards(args.shards)
    lines = [f"`{' '.join(['python scripts/text_use.py', *[str(r) for r in args.runs]])}` on {args.shards} "
             f"({args.count} utterances)", "",
             "| model | own text | another text | no text | another - own | none - own |",
             "|---|---:|---:|---:|---:|---:|"]
    results = {}
    for run in args.runs:
        model, tok = load_speechlm(run, shards.codebook_size, codec_id=shards.codec_id)
        use = text_use(model, tok, shards, args.count, args.seed)
        (other, other_se), (none, none_se) = use.gap("other"), use.gap("none")
        lines.append(f"| {run} | " + " | ".join(f"{use.mean(c):.3f}" for c in CONDITIONS)
                     + f" | {other:+.3f} ± {other_se:.3f} | {none:+.3f} ± {none_se:.3f} |")
        results[str(run)] = {"mean": {c: use.mean(c) for c in CONDITIONS},
                             "gap": {"other": [other, other_se], "none": [none, none_se]},
                             "losses": {c: use.losses[c].tolist() for c in CONDITIONS}, "ids": use.ids}
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"shards": args.shards, "count": args.count, "seed": args.seed,
                                        "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

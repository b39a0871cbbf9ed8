"""The one entry point for every training stage:

    python train.py stage=<name> [experiment=<tiny|quickstart|base>] [hydra overrides]

A stage is a file configs/stage/<name>.yaml whose `run` names the function that does the work; that
function gets the composed config and its run folder, runs/<stage>/<run_name>/. Re-running a stage with
the same run_name resumes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
USAGE = "usage: python train.py stage=<name> [experiment=<tiny|quickstart|base>] [key=value ...]"


def available_stages() -> list[str]:
    """Stages that exist: one config file each under configs/stage/."""
    return sorted(path.stem for path in (CONFIG_DIR / "stage").glob("*.yaml"))


def stage_argument_error(argv: list[str]) -> str | None:
    """A message naming the stages that exist when `stage=` is missing or unknown, else None."""
    stages = available_stages()
    listing = f"stages: {', '.join(stages)}" if stages else "no stages exist yet"
    given = [arg.split("=", 1)[1] for arg in argv if arg.startswith("stage=")]
    if not given:
        return f"{USAGE}\nmissing stage=<name>; {listing}"
    if given[-1] not in stages:
        return f"{USAGE}\nunknown stage '{given[-1]}'; {listing}"
    return None


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from voxlm.runs import prepare_run

    run_dir = prepare_run(cfg)
    run_stage = hydra.utils.get_method(cfg.stage.run)
    run_stage(cfg, run_dir)


if __name__ == "__main__":
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(f"{USAGE}\nstages: {', '.join(available_stages())}\nconfigs: {CONFIG_DIR}")
        sys.exit(0)
    error = stage_argument_error(sys.argv[1:])
    if error:
        print(error, file=sys.stderr)
        sys.exit(2)
    main()

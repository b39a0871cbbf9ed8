"""Export trained checkpoints to a MAX artifact, admitted only by the parity gate:

    python export.py [experiment=quickstart] [speechlm=runs/rlhf/quickstart] [codec=quickstart]
                     [device=cpu|gpu] [dtype=float32|bfloat16] [out=artifacts/quickstart]

Prints the parity table; on any failure exits 1 naming the module and the error, and writes no artifact.
Options: configs/export.yaml. What the artifact holds: voxlm.export.artifact.

`speechlm=` and `codec=` name checkpoints here, but are also the names of training config groups that this
config composes (for the corpus and the experiment overlays), so they are passed on as sources.speechlm= and
sources.codec=.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from voxlm.export.parity import ParityError


@hydra.main(version_base="1.3", config_path="configs", config_name="export")
def main(cfg: DictConfig) -> None:
    from voxlm.export.build import export_artifact

    try:
        out = export_artifact(cfg)
    except ParityError as error:
        print(f"export.py: {error}; no artifact written", file=sys.stderr)
        sys.exit(1)
    except (FileNotFoundError, ValueError) as error:
        print(f"export.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"artifact written to {out}")


def route_sources(args: list[str]) -> list[str]:
    """speechlm=X / codec=X -> sources.speechlm=X / sources.codec=X."""
    return [f"sources.{arg}" if arg.split("=", 1)[0] in ("speechlm", "codec") else arg for arg in args]


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *route_sources(sys.argv[1:])]
    main()

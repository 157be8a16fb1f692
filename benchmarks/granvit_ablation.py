"""GranViT's parts at toy scale, side by side on the demo's recipe (`finevit-vl quickstart`: Stage III + SFT + the
lmms-eval suite), same data, steps and seed, one `--set` away from each other:

* baseline: the demo as shipped (region data in both directions, encoder trained in both stages);
* + self-distillation: `distill.enabled=true` in Stage III (EMA teacher on box crops, ROIAlign, MSE weight 1);
* encoder frozen in SFT: `modules.vision_tower.train=false` in SFT (the paper: unfreezing helps local tasks).

    python benchmarks/granvit_ablation.py [--out runs/granvit_ablation] [--baseline RUN_DIR]

`--baseline` reuses a finished default `finevit-vl quickstart` run folder (e.g. the scratch arm of
`pretraining_ablation.py`). Writes `OUT/results.json` / `OUT/results.md`, copied to
`benchmarks/results/granvit_ablation.*`.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from pretraining_ablation import ROOT, _cli, markdown


ARMS = {
    "baseline": [],
    "+ self-distillation (Stage III)": ["--set", "stage3:distill.enabled=true"],
    "encoder frozen in SFT": ["--set", "sft:modules.vision_tower.train=false"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/granvit_ablation")
    parser.add_argument("--baseline", help="a finished default quickstart run folder to reuse as the baseline arm")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    runs = {name: Path(args.baseline).resolve() if name == "baseline" and args.baseline else out / f"arm{index}"
            for index, name in enumerate(ARMS)}
    # The other arms first: a reused baseline may still be running when this starts.
    for name in sorted(ARMS, key=lambda name: name == "baseline"):
        if not (runs[name] / "eval" / "results.json").exists():
            if name == "baseline" and args.baseline:
                raise SystemExit(f"--baseline {runs[name]} has no eval/results.json (a finished quickstart run)")
            _cli("quickstart", "--out", str(runs[name]), *ARMS[name])
    scores = {name: json.loads((runs[name] / "eval" / "results.json").read_text())["results"] for name in ARMS}
    results = {"stages": scores}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    for suffix in ("json", "md"):
        shutil.copy(out / f"results.{suffix}", ROOT / "benchmarks" / "results" / f"granvit_ablation.{suffix}")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

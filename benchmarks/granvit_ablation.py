"""GranViT's parts at toy scale, side by side on the demo's recipe (`finevit-vl quickstart`: Stage III + SFT + the
lmms-eval suite), same data, steps and seed, one `--set` away from each other:

* baseline: the demo as shipped (region data in both directions, encoder trained in both stages);
* no region data in Stage III: only its global-caption and OCR records (`data.train.tasks`), so no box -> caption
  and no caption -> box turns before SFT (ablation a, on grounding);
* + self-distillation: `distill.enabled=true` in Stage III (EMA teacher on box crops, ROIAlign, MSE weight 1),
  everything trained jointly in both directions: GranViT's "one joint phase" (ablations b and c);
* two phases in Stage III (`train.phases`, the same steps): the first half with the LLM frozen, box -> caption turns
  and distillation, the second with the encoder frozen, caption -> box turns and no distillation (ablation c);
* encoder frozen in SFT: `modules.vision_tower.train=false` in SFT (ablation d; the paper: unfreezing helps).

    python benchmarks/granvit_ablation.py [--out runs/granvit_ablation] [--baseline RUN_DIR] [--arms NAME ...]

`--baseline` reuses a finished default `finevit-vl quickstart` run folder (e.g. the scratch arm of
`pretraining_ablation.py`). `--arms` runs only those arms and takes the others from the recorded
`benchmarks/results/granvit_ablation.json`, and only when this run's baseline reproduces its recorded scores exactly
(the recipe is deterministic on one machine; otherwise they are left out). Writes `OUT/results.json` /
`OUT/results.md`, copied to `benchmarks/results/granvit_ablation.*`.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from pretraining_ablation import ROOT, _cli, markdown


RECORDED = ROOT / "benchmarks" / "results" / "granvit_ablation.json"


def _two_phases() -> list[str]:
    """GranViT's two phases inside the demo's Stage III, split at half its steps."""
    from finevit_vl.quickstart import Recipe

    half = Recipe().steps("stage3") // 2
    phases = (f"[{{start_step: 0, frozen_modules: [language_model], region_directions: box_to_text, distill_weight: 1.0}}, "
              f"{{start_step: {half}, frozen_modules: [vision_tower], region_directions: text_to_box, distill_weight: 0.0}}]")
    return ["--set", "stage3:distill.enabled=true", "--set", f"stage3:train.phases={phases}"]


ARMS = {
    "baseline": [],
    "no region data in Stage III": ["--set", "stage3:data.train.tasks=[caption,ocr]"],
    "+ self-distillation (Stage III, one joint phase)": ["--set", "stage3:distill.enabled=true"],
    "two phases in Stage III (+ distillation in the first)": _two_phases(),
    "encoder frozen in SFT": ["--set", "sft:modules.vision_tower.train=false"],
}
# Names the arms had in earlier recorded results.
RECORDED_NAMES = {"+ self-distillation (Stage III)": "+ self-distillation (Stage III, one joint phase)"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/granvit_ablation")
    parser.add_argument("--baseline", help="a finished default quickstart run folder to reuse as the baseline arm")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), help="run these arms only (the baseline always runs)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    chosen = list(ARMS) if not args.arms else ["baseline", *(name for name in args.arms if name != "baseline")]
    runs = {name: Path(args.baseline).resolve() if name == "baseline" and args.baseline else out / f"arm{index}"
            for index, name in enumerate(ARMS) if name in chosen}
    # The other arms first: a reused baseline may still be running when this starts.
    for name in sorted(runs, key=lambda name: name == "baseline"):
        if not (runs[name] / "eval" / "results.json").exists():
            if name == "baseline" and args.baseline:
                raise SystemExit(f"--baseline {runs[name]} has no eval/results.json (a finished quickstart run)")
            _cli("quickstart", "--out", str(runs[name]), *ARMS[name])
    scores = {name: json.loads((runs[name] / "eval" / "results.json").read_text())["results"] for name in runs}
    notes = []
    if len(runs) < len(ARMS) and RECORDED.exists():
        recorded = {RECORDED_NAMES.get(name, name): arm for name, arm in json.loads(RECORDED.read_text())["stages"].items()}
        if recorded.get("baseline") == scores["baseline"]:
            reused = [name for name in ARMS if name not in scores and name in recorded]
            scores.update({name: recorded[name] for name in reused})
            notes.append(f"taken from the recorded results (this run's baseline reproduced them exactly): {reused}")
        else:
            notes.append("the recorded arms were left out: this run's baseline does not reproduce the recorded one")
    results = {"stages": {name: scores[name] for name in ARMS if name in scores}, "notes": notes}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results) + "".join(f"\n{note}\n" for note in notes))
    for suffix in ("json", "md"):
        shutil.copy(out / f"results.{suffix}", ROOT / "benchmarks" / "results" / f"granvit_ablation.{suffix}")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

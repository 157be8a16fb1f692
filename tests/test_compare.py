"""`finevit-vl compare` at a short budget: two encoders through the same recipe, one side-by-side report."""

import json

import pytest
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    from finevit_vl.cli import main

    out = tmp_path_factory.mktemp("compare") / "run"
    assert main(["compare", "--encoders", "finevit", "siglip", "--minutes", "0.05", "--families", "counting",
                 "--out", str(out)]) == 0
    return out


def test_report_puts_the_encoders_side_by_side_with_baselines(comparison):
    report = (comparison / "report.md").read_text()
    assert "| task | metric | finevit | siglip | trivial baseline |" in report
    assert "finevit_countbench" in report and "SigLIP: fixed size (squashed)" in report
    assert (comparison / "loss_curves.png").stat().st_size > 10_000
    results = json.loads((comparison / "results.json").read_text())["results"]
    for encoder in ("finevit", "siglip"):
        profile = results[encoder]["profile"]
        assert profile["gflops_per_image"] > 0 and profile["images_per_s"] > 0
        assert 0 <= results[encoder]["rows"][0]["model"] <= 1
    # The fixed-size tower sees one square grid whatever the image: (side / patch / 2)^2 tokens, each merged 2 x 2.
    vision = json.loads((comparison / "siglip" / "init" / "config.json").read_text())["vision_config"]
    side = -(-vision["image_size"] // vision["patch_size"] // 2)
    assert results["siglip"]["profile"]["tokens_per_image"] == side * side
    assert results["siglip"]["profile"]["patches_per_image"] == (vision["image_size"] // vision["patch_size"]) ** 2


def test_runs_differ_in_the_encoder_alone(comparison):
    finevit = load_file(str(comparison / "finevit" / "init" / "model.safetensors"))
    siglip = load_file(str(comparison / "siglip" / "init" / "model.safetensors"))
    shared = [name for name in finevit if ".vision_tower." not in f".{name}"]
    assert shared and all(name in siglip and finevit[name].equal(siglip[name]) for name in shared)
    assert finevit["model.vision_tower.patch_embed.proj.weight"].shape != siglip["model.vision_tower.embeddings.patch_embedding.weight"].shape
    configs = [(comparison / encoder / "sft" / "config.yaml").read_text() for encoder in ("finevit", "siglip")]
    assert configs[0].replace("/finevit/", "/X/") == configs[1].replace("/siglip/", "/X/")  # same recipe

"""Training config: YAML + key=value overrides, strict keys, the shipped configs (`finevit_vl.train.config`)."""

import re
from pathlib import Path

import pytest
import yaml

from finevit_vl.data import HFDatasetSourceConfig, JsonlSourceConfig, MixtureSourceConfig
from finevit_vl.train.config import config_to_dict, load_config, save_config


CONFIG_DIR = Path(__file__).resolve().parents[1] / "train_configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_overrides_are_yaml_typed_and_dotted(tmp_path):
    config = load_config(CONFIG_DIR / "tiny_cpu_stage3.yaml", [
        "train.max_steps=7", "data.pack=false", "modules.vision_tower.lr=1e-5", f"run_dir={tmp_path}/run",
        "eval.tasks=[a, b]",
    ])
    assert config.train.max_steps == 7 and config.data.pack is False
    assert config.modules.vision_tower.lr == 1e-5 and config.eval.tasks == ["a", "b"]
    assert config.run_dir == str(tmp_path / "run")
    assert Path(config.data.train.path).is_absolute()  # stored absolute: the run folder reproduces the run


def test_resolved_config_round_trips(tmp_path):
    config = load_config(CONFIG_DIR / "tiny_cpu_sft.yaml", ["train.max_steps=3"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("override, message", [
    ("train.max_stpes=3", r"unknown config key.*train\.max_stpes"),
    ("model.path=/x", "exactly one of model.init"),
    ("model.quantization=4bit", "needs lora.enabled"),
    ("lora.export=zip", "lora.export"),
    ("trainmax_steps", "not key=value"),
])
def test_mistakes_raise_actionable_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIG_DIR / "tiny_cpu_stage3.yaml", [override])


def test_data_sources_are_typed_and_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    mixture = ('data.train={type: mixture, seed: 3, weights: [1, "2"], sources: [{type: jsonl, path: a.jsonl}, '
               '{type: hf, path: org/name, split: test}, {type: jsonl, path: ~/b.jsonl, image_root: img}]}')
    config = load_config(CONFIG_DIR / "tiny_cpu_sft.yaml", [mixture, "data.eval.path=e.jsonl"])
    assert config.data.train == MixtureSourceConfig(
        sources=[
            JsonlSourceConfig(str(tmp_path / "a.jsonl")),
            HFDatasetSourceConfig("org/name", split="test"),  # a hub name: as written
            JsonlSourceConfig(str(tmp_path / "home" / "b.jsonl"), image_root=str(tmp_path / "img")),
        ],
        weights=[1.0, 2.0],
        seed=3,
    )
    assert config.data.eval == JsonlSourceConfig(str(tmp_path / "e.jsonl"))
    saved = config_to_dict(config)["data"]
    assert saved["eval"] == {"type": "jsonl", "path": str(tmp_path / "e.jsonl"), "image_root": None, "tasks": None}
    assert saved["train"]["type"] == "mixture" and saved["train"]["sources"][1]["type"] == "hf"
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("override, message", [
    ("data.train={type: csv, path: x}", r"config key data\.train\.type: expected one of \['hf', 'jsonl', 'mixture'"),
    ("data.train={type: jsonl, path: x, root: .}", r"unknown config key\(s\) \['data\.train\.root'\]"),
    ("data.train={type: jsonl}", r"missing config key\(s\) \['data\.train\.path'\]"),
    ("data.train=data/x.jsonl", r"config key data\.train: expected a mapping with a type"),
    ("data.train={type: mixture, sources: [{type: hf, path: x, split: 3}]}",
     r"config key data\.train\.sources\[0\]\.split: expected a string, got 3"),
    ("data.train={type: mixture, sources: [], weights: [a]}", r"config key data\.train\.weights\[0\]: expected a number"),
    ("data.train={type: mixture, sources: [], seed: x}", r"config key data\.train\.seed: expected an integer"),
    ("data.train={type: webdataset, shards: {a: 1}}", r"config key data\.train\.shards: expected"),
    ("optim.betas=[0.9]", r"config key optim\.betas: expected a list of 2 values"),
])
def test_wrong_source_keys_and_types_name_the_dotted_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIG_DIR / "tiny_cpu_stage3.yaml", [override])


def test_freezing_everything_is_refused():
    frozen = [f"modules.{m}.train=false" for m in ("vision_tower", "multi_modal_projector", "language_model")]
    with pytest.raises(ValueError, match="nothing to train"):
        load_config(CONFIG_DIR / "tiny_cpu_stage3.yaml", frozen)


def _documented_world_sizes(path: Path) -> list[int] | None:
    """Process counts of the launch a config's header documents: `--config_file` of a shipped accelerate config, or
    `--num_processes N`; `None` when it documents none."""
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    if match := re.search(r"--config_file (\S+\.yaml)", header):
        return [yaml.safe_load((CONFIG_DIR.parent / match.group(1)).read_text())["num_processes"]]
    if match := re.search(r"--num_processes (\d+)", header):
        return [int(match.group(1))]
    return None


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_training_configs_load_and_fit_their_launch(path):
    config = load_config(path)  # validates
    world_sizes = _documented_world_sizes(path)
    if world_sizes is None:  # the tiny CPU configs: one process (the demo) or `accelerate/cpu_2proc.yaml`
        assert path.name.startswith("tiny_cpu"), f"{path.name} documents no launch command"
        world_sizes = [1, yaml.safe_load((CONFIG_DIR / "accelerate" / "cpu_2proc.yaml").read_text())["num_processes"]]
    for world_size in world_sizes:
        config.check_world_size(world_size)  # each rank gets an equal share of every global batch


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    paths = sorted((CONFIG_DIR / "accelerate").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"ddp", "ddp_multinode", "fsdp2", "fsdp2_multinode", "deepspeed_zero2",
                                        "deepspeed_zero3", "deepspeed_zero3_multinode", "cpu_2proc"}
    for path in paths:
        cluster = load_config_from_file(str(path))
        assert cluster.num_processes >= 2, path
        raw = yaml.safe_load(path.read_text())
        if raw["distributed_type"] == "FSDP":
            # Wrap units come from the model's _no_split_modules (FineViTBlock + the decoder layer).
            assert raw["fsdp_config"]["fsdp_version"] == 2 and "fsdp_transformer_layer_cls_to_wrap" not in raw["fsdp_config"]


def test_package_data_symlink_points_at_the_configs():
    import finevit_vl

    linked = Path(finevit_vl.__file__).parent / "train_configs"
    assert linked.resolve() == CONFIG_DIR.resolve()

"""Where the FineViT lmms-eval tasks live, and how to point them at local copies of their datasets.

lmms-eval reads ``dataset_path`` from static yaml, so local data is handled by generating a small task directory whose
yamls ``include`` the shipped ones and override only the dataset source::

    DATA_DIR/<folder>/<split>.parquet   # folder per dataset, see LOCAL_FOLDERS; same columns as the HF dataset

    lmms-eval ... --include_path "$(finevit-vl tasks-path)"                      # HF datasets
    lmms-eval ... --include_path "$(finevit-vl tasks-path --data-dir DATA_DIR)"  # local parquet files

Use one or the other: both directories define the same task names.
"""

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import yaml


SUITE_GROUP = "finevit_suite"

# HF dataset used by the shipped yamls -> folder holding its local copy inside a data directory.
LOCAL_FOLDERS: dict[str, str] = {
    "lmms-lab-encoder/DocVQA": "docvqa",
    "lmms-lab-encoder/ChartQA": "chartqa",
    "echo840/OCRBench": "ocrbench",
    "vikhyatk/CountBenchQA": "countbench",
    "lmms-lab-encoder/RefCOCO": "refcoco",
    "lmms-lab-encoder/RefCOCOplus": "refcoco+",
    "lmms-lab-encoder/RefCOCOg": "refcocog",
}


def tasks_dir() -> str:
    """The shipped task directory (``finevit_vl/eval_tasks``, a link to the top-level ``eval_tasks`` in a checkout)."""
    path = Path(__file__).resolve().parent.parent / "eval_tasks"
    if not (path / f"{SUITE_GROUP}.yaml").is_file():
        raise FileNotFoundError(f"FineViT task yamls not found in {path}; reinstall finevit-vl or run from a checkout.")
    return str(path.resolve())


class _TagIgnoringLoader(yaml.SafeLoader):
    """Reads task yamls without importing their ``!function`` hooks."""


_TagIgnoringLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _read_task_yaml(path: Path) -> dict:
    with open(path) as f:
        config = yaml.load(f, Loader=_TagIgnoringLoader)
    if "include" in config:
        with open(path.parent / config["include"]) as f:
            config = {**yaml.load(f, Loader=_TagIgnoringLoader), **config}
    return config


def task_configs(directory: str | None = None) -> dict[str, dict]:
    """Task name -> its resolved yaml config (with ``yaml_path``), for the tasks in ``directory`` (default: shipped)."""
    configs = {}
    for path in sorted(Path(directory or tasks_dir()).glob("*.yaml")):
        config = _read_task_yaml(path)
        if "task" in config and "group" not in config:
            configs[config["task"]] = {**config, "yaml_path": str(path)}
    return configs


def suite_tasks(directory: str | None = None) -> list[str]:
    """The tasks of the ``finevit_suite`` group, in order."""
    with open(Path(directory or tasks_dir()) / f"{SUITE_GROUP}.yaml") as f:
        return list(yaml.safe_load(f)["task"])


def local_data_file(data_dir: str, config: dict) -> Path:
    """``DATA_DIR/<folder>/<test_split>.parquet`` for a task config."""
    return Path(data_dir).resolve() / LOCAL_FOLDERS[config["dataset_path"]] / f"{config['test_split']}.parquet"


def missing_local_data(data_dir: str, tasks: list[str]) -> dict[str, str]:
    """Task -> expected parquet path, for each requested task (or suite) whose local file is missing."""
    configs = task_configs()
    names = [name for task in tasks for name in (suite_tasks() if task == SUITE_GROUP else [task])]
    return {
        name: str(local_data_file(data_dir, configs[name]))
        for name in names
        if name in configs and not local_data_file(data_dir, configs[name]).is_file()
    }


def local_tasks_dir(data_dir: str, out_dir: str | None = None) -> str:
    """Write task yamls that read the parquet files under ``data_dir`` and return their directory.

    Only tasks whose file exists are written; the ``finevit_suite`` group lists those. ``out_dir`` defaults to a
    stable per-``data_dir`` folder in the temp directory, rewritten on each call (safe to call from every rank).
    """
    data_dir = str(Path(data_dir).resolve())
    if not Path(data_dir).is_dir():
        raise ValueError(f"--data-dir {data_dir} is not a directory.")
    if out_dir is None:
        digest = hashlib.sha1(data_dir.encode()).hexdigest()[:12]
        out_dir = os.path.join(tempfile.gettempdir(), f"finevit_vl_tasks_{digest}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    written = {}
    for name, config in task_configs().items():
        data_file = local_data_file(data_dir, config)
        if data_file.is_file():
            written[f"{name}.yaml"] = {
                "task": name,
                "include": config["yaml_path"],
                "dataset_path": "parquet",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {config["test_split"]: str(data_file)}},
            }
    if not written:
        expected = ", ".join(f"{folder}/<split>.parquet" for folder in dict.fromkeys(LOCAL_FOLDERS.values()))
        raise ValueError(f"No local benchmark data found in {data_dir}; expected some of: {expected}.")
    suite = [name for name in suite_tasks() if f"{name}.yaml" in written]
    written[f"{SUITE_GROUP}.yaml"] = {"group": SUITE_GROUP, "task": suite}

    for stale in {p.name for p in out.glob("*.yaml")} - set(written):
        (out / stale).unlink(missing_ok=True)
    for file_name, config in written.items():
        # Write-then-rename so concurrent ranks never read a half-written yaml.
        fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        os.replace(tmp, out / file_name)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finevit-vl tasks-path", description="Print the directory to pass to `lmms-eval --include_path`."
    )
    parser.add_argument(
        "--data-dir", help="read local parquet copies of the benchmarks from DATA_DIR/<dataset>/<split>.parquet"
    )
    parser.add_argument("--out", help="where to write the local-data task yamls (default: a folder in the temp dir)")
    args = parser.parse_args(argv)
    try:
        print(local_tasks_dir(args.data_dir, args.out) if args.data_dir else tasks_dir())
    except (ValueError, FileNotFoundError) as error:
        print(f"finevit-vl tasks-path: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

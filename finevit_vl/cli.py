"""`finevit-vl` command line: one entry point, each sub-command implemented in its own module.

Sub-commands are imported lazily (and `import finevit_vl` does not import torch), so `finevit-vl --help` and
`finevit-vl --version` are instant and a sub-command's heavy dependencies (accelerate, lmms-eval) are only needed when
it runs.
"""

import importlib
import os
import sys


DEBUG_ENV = "FINEVIT_VL_DEBUG"  # set by `finevit-vl --debug`: user errors show their traceback too


# name -> ("module:function", one-line help). Each function takes the remaining argv and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "build": ("finevit_vl.assembly:main", "assemble a FineViT-VL from a vision encoder (FineViT, SigLIP2, Qwen2-VL, ... or a preset) and any HF causal LM"),
    "make-data": ("finevit_vl.data.synthetic:main", "generate the synthetic fine-grained data set (train + held-out eval)"),
    "train": ("finevit_vl.train.__main__:main", "train a stage from a YAML config (use `accelerate launch -m finevit_vl.train` for multi-process)"),
    "export": ("finevit_vl.train.export:main", "turn a training checkpoint (or a run folder's newest) into a Hugging Face model folder"),
    "eval": ("finevit_vl.eval.suite:main", "run an lmms-eval suite of FineViT tasks on a checkpoint and write JSON + markdown"),
    "eval-zeroshot": ("finevit_vl.eval.zeroshot:main", "zero-shot classification / image-text retrieval of a contrastive model (CLIP_benchmark protocol)"),
    "quickstart": ("finevit_vl.quickstart:main", "the demo: data -> tiny model -> Stage III -> SFT -> lmms-eval -> report"),
    "compare": ("finevit_vl.compare:main", "the same recipe with several vision encoders, side by side (FineViT vs SigLIP2 vs Qwen2-VL ...)"),
    "bench": ("finevit_vl.bench:main", "run the benchmarks in benchmarks/ and write results + BENCHMARKS.md"),
    "chat": ("finevit_vl.chat:main", "chat with a checkpoint in the terminal: multi-turn, images, streamed answers"),
    "web-demo": ("finevit_vl.web_demo:main", "a browser demo (Gradio): image upload, chat, boxes drawn on the image"),
    "serve": ("finevit_vl.web_demo:main", "the same as web-demo"),
    "tasks-path": ("finevit_vl.eval.tasks_path:main", "print the directory to pass to `lmms-eval --include_path`"),
}


def report_user_error(command: str, error: BaseException) -> int:
    """A user's mistake (a path, a config value, an unsupported part) as one line on stderr and exit code 2; with
    `finevit-vl --debug` (or FINEVIT_VL_DEBUG=1) the exception is raised, traceback and all."""
    if os.environ.get(DEBUG_ENV):
        raise error
    print(f"finevit-vl {command}: error: {error}", file=sys.stderr)
    return 2


def _usage() -> str:
    lines = ["usage: finevit-vl [--version] [--debug] <command> [args]   (`finevit-vl <command> --help` for its options)",
             "", "--debug: show the traceback of an error (user errors are one line otherwise)", "",
             "commands:"]
    lines += [f"  {name:<12} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from finevit_vl import __version__

        print(f"finevit-vl {__version__}")
        return 0
    if argv[0] == "--debug":
        os.environ[DEBUG_ENV] = "1"
        argv = argv[1:] or ["--help"]
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"finevit-vl: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name = COMMANDS[name][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

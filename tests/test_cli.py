"""The `finevit-vl` entry point: `--help` and `--version` answer without importing torch, and `import finevit_vl`
still registers the Auto classes whichever of it and transformers is imported first."""

import subprocess
import sys

import pytest


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300).stdout


@pytest.mark.parametrize("argv", [["--help"], ["--version"]])
def test_help_and_version_do_not_import_torch(argv):
    out = _python(f"import sys; from finevit_vl.cli import main; main({argv!r}); print('torch' in sys.modules)")
    assert out.splitlines()[-1] == "False"
    assert ("finevit-vl 0" in out) if argv == ["--version"] else ("commands:" in out and "tasks-path" in out)


@pytest.mark.parametrize("code", [
    "import finevit_vl; from transformers import AutoConfig",  # package first
    "import transformers; import finevit_vl",  # transformers first
    "import finevit_vl; finevit_vl.FineViTVLConfig",  # a model class on first use
    "import finevit_vl.cli, finevit_vl.data",  # a sub-package that imports the models while transformers loads
])
def test_auto_classes_are_registered(code):
    out = _python(code + "\nfrom transformers.models.auto.configuration_auto import CONFIG_MAPPING as m\n"
                  "print('finevit' in m and 'finevit_vl' in m)")
    assert out.splitlines()[-1] == "True"


def test_user_mistakes_get_a_message_and_exit_2_without_a_traceback(tmp_path):
    for args, message in (
        (["build", "--vision", "finevit-test", "--llm", str(tmp_path / "missing"), "--out", str(tmp_path / "vl")],
         "is not a directory"),
        (["train", str(tmp_path / "missing.yaml")], "config file not found"),
    ):
        result = subprocess.run([sys.executable, "-m", "finevit_vl.cli", *args], capture_output=True, text=True,
                                timeout=120, check=False)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "finevit_vl.cli", "--debug", "train", str(tmp_path / "missing.yaml")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0 and "Traceback" in result.stderr and "config file not found" in result.stderr


def test_every_option_of_every_command_has_help_text():
    import argparse
    import importlib
    from unittest import mock

    from finevit_vl.cli import COMMANDS

    for name, (target, _) in COMMANDS.items():
        module_name, function_name = target.split(":")
        parsers = []

        def capture(self, *args, _parsers=parsers, **kwargs):
            _parsers.append(self)
            raise SystemExit(0)

        with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
            try:
                getattr(importlib.import_module(module_name), function_name)(["--help"])
            except SystemExit:
                pass
        assert parsers, f"finevit-vl {name} --help never built its parser"
        for parser in parsers:
            for action in parser._actions:
                if not isinstance(action, argparse._HelpAction):
                    assert action.help, f"finevit-vl {name}: {action.option_strings or action.dest} has no help text"

"""The command line's layout: one module per command (`add_parser`, `run`, `COMPILES`), `cli/app.py` only builds
the parser and dispatches, building it imports no JAX, and the package never imports the repo's conversion/ kit."""

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

from qwen2vl_jax import cli
from qwen2vl_jax.cli import app, common

PACKAGE = Path(cli.__file__).resolve().parents[1]
COMMAND_NAMES = ["generate", "chat", "predict", "eval", "convert", "info", "plan", "export", "serve", "selfcheck",
                 "finetune"]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_each_command_is_its_own_module():
    assert [m.__name__ for m in app.COMMANDS] == [f"qwen2vl_jax.cli.{n}" for n in COMMAND_NAMES]
    parsers = _subcommands(cli.build_parser())
    assert list(parsers) == COMMAND_NAMES  # --help lists them in this order
    for module in app.COMMANDS:
        name = module.__name__.rsplit(".", 1)[1]
        assert callable(module.add_parser) and callable(module.run) and isinstance(module.COMPILES, bool)
        leaves = _subcommands(parsers[name]).values() if name == "convert" else [parsers[name]]
        for leaf in leaves:  # every (sub)command dispatches to its module's `run`
            assert leaf.get_default("func") is module.run, name
        flags = {s for a in parsers[name]._actions for s in a.option_strings}
        assert ("--no-compile-cache" in flags) is module.COMPILES, name
    assert set(app.COMPILING_COMMANDS) == {"generate", "chat", "predict", "eval", "serve", "selfcheck",
                                           "finetune"}
    # app.py holds the parser and the dispatch only; the package re-exports what callers use
    tree = ast.parse(Path(app.__file__).read_text())
    assert sorted(n.name for n in tree.body if isinstance(n, ast.FunctionDef)) == ["build_parser", "main"]
    assert cli.main is app.main and cli.build_parser is app.build_parser
    assert cli.USER_ERROR_TYPES is common.USER_ERROR_TYPES and cli.API_KEY_ENV == "QWEN2VL_JAX_API_KEY"


def test_building_the_parser_imports_no_jax():
    code = ("import json, sys; from qwen2vl_jax import cli; cli.build_parser(); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('jax', 'jaxlib', 'flax', 'torch', 'transformers', 'conversion'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_the_package_never_imports_the_conversion_kit():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.relative_to(PACKAGE)}: {n}" for n in names if n.split(".")[0] == "conversion"]
    assert offenders == []


def test_convert_flags_match_the_library():
    from qwen2vl_jax.checkpoints import convert as library
    from qwen2vl_jax.cli import convert as command

    # the parser states the library's defaults without importing it (JAX)
    assert command.DEFAULT_FLAX_SHARD_SIZE == library.DEFAULT_FLAX_SHARD_SIZE
    assert command.DEFAULT_HF_SHARD_SIZE == library.DEFAULT_HF_SHARD_SIZE
    convert = _subcommands(_subcommands(cli.build_parser())["convert"])
    assert convert["hf-to-flax"].get_default("max_shard_size") == library.DEFAULT_FLAX_SHARD_SIZE
    assert convert["flax-to-hf"].get_default("max_shard_size") == library.DEFAULT_HF_SHARD_SIZE


def test_convert_reports_like_the_old_converters(tiny_checkpoint, tmp_path, capsys):
    """`qwen2vl-jax convert` prints the summary line (exit 0), or `error: ...` for a source that is not a
    checkpoint (exit 2), as the converter commands it replaces did."""
    assert cli.main(["convert", "hf-to-flax", str(tiny_checkpoint), str(tmp_path / "a"), "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("wrote 58 tensors") and out.err == ""
    assert cli.main(["convert", "flax-to-hf", str(tmp_path / "a"), str(tmp_path / "b"), "--quiet"]) == 0
    assert str(tmp_path / "b") in capsys.readouterr().out
    assert cli.main(["convert", "flax-to-hf", str(tmp_path / "nothing"), str(tmp_path / "c"), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: ")

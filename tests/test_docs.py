"""The README and docs/config.md say what the code does: every CLI flag and config key is
documented, and nothing documented is missing from the code."""

import argparse
import dataclasses
import re
from pathlib import Path

from simgap.cli import parser
from simgap.experiment.config import Config

ROOT = Path(__file__).resolve().parent.parent


def _config_keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _config_keys(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_docs_config_lists_every_key_and_only_keys_that_exist():
    doc = (ROOT / "docs" / "config.md").read_text()
    keys = set(_config_keys(Config()))
    listed = set(re.findall(r"`((?:sources|similarity|reference|scan|splits|train|evaluate|"
                            r"analysis|engine)\.[a-z0-9_.]+)`", doc))  # fmt: skip
    recipe = {k for k in keys if k.startswith("similarity.recipe.")}
    assert "`similarity.recipe.*`" in doc  # the similarity recipe has train.recipe's keys
    top = {k for k in keys if "." not in k}
    assert keys - recipe - top - listed == set()
    assert all(f"`{k}`" in doc for k in top)
    # Anything named is a key or a section of keys.
    assert {n for n in listed if not any(k == n or k.startswith(n + ".") for k in keys)} == set()


def _commands():
    ap = parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _readme_cli() -> dict[str, str]:
    """The README's command-line block: command -> its lines."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Command line at a glance", 1)[1].split("```", 2)[1]
    usage: dict[str, str] = {}
    command = None
    for line in block.splitlines():
        found = re.match(r"simgap (\w+)", line)
        if found:
            command = found.group(1)
        if command:
            usage[command] = usage.get(command, "") + line.split("#")[0] + "\n"
    return usage


def test_readme_cli_shows_every_flag_of_every_command_and_no_other():
    usage = _readme_cli()
    commands = _commands()
    assert set(usage) == set(commands)
    for name, p in commands.items():
        flags = {s for a in p._actions for s in a.option_strings if s not in ("-h", "--help")}
        shown = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", usage[name]))
        missing = {f for f in flags if f.startswith("--") and f not in shown}
        # A flag with a short form may be shown by it (-o, -v).
        missing -= {
            max(a.option_strings, key=len)
            for a in p._actions
            if any(s in shown for s in a.option_strings)
        }
        assert not missing, (name, missing)
        assert shown <= flags, (name, shown - flags)


# Written on other branches at the time of writing (issue 16); drop from here once merged.
PENDING = {"docs/faults.md", "docs/scan-numerics.md"}


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)", text):
        if not target.startswith("http") and target not in PENDING:
            assert (ROOT / target).exists(), target
    assert len(text.splitlines()) <= 300

"""The ``searchrl`` front door: every command module is registered, a missing one is an error."""

from __future__ import annotations

import pytest

import searchrl.cli as cli


def test_every_command_is_registered():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"world", "index", "search", "serve", "eval", "ask", "train"} <= set(sub.choices)


def test_a_missing_command_module_is_an_error_not_a_silent_skip(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "searchrl.no_such_stage"])
    with pytest.raises(ModuleNotFoundError, match="searchrl.no_such_stage"):
        cli.build_parser()

"""The method registry: every registered method's flags reach `qpeft decompose`, a
flag given to another method is one line naming its method, an unknown method is
one line listing the registered ones (CLI, library API and recipes alike)."""

from __future__ import annotations

import itertools
import re

import pytest

from qpeft.cli import build_parser
from qpeft.errors import QpeftError
from qpeft.methods import METHODS, method_plugin
from qpeft.stages.decompose import DecomposeRequest
from tests.conftest import assert_one_line_error, run

REGISTERED = ", ".join(METHODS)


def test_every_plugin_flag_is_a_decompose_flag_that_defaults_to_none():
    args = build_parser().parse_args(["decompose", "--config", "nf3", "--out", "x"])
    for plugin in METHODS.values():
        assert set(plugin.flags) <= set(vars(args)), plugin.name
        assert all(getattr(args, key) is None for key in plugin.flags), plugin.name
        assert set(plugin.flags) <= {f.name for f in plugin.options.__dataclass_fields__.values()}


def test_unknown_method(tiny_model_dir, tmp_path, capsys):
    message = f"--method: unknown method 'svd' (registered: {REGISTERED})"
    code, _, err = run(capsys, "decompose", str(tiny_model_dir), "--method", "svd", "--config", "nf3",
                       "--out", str(tmp_path / "o"))  # fmt: skip
    assert_one_line_error(code, err, message)
    with pytest.raises(QpeftError, match=f"^{re.escape(message)}$"):
        DecomposeRequest(None, tmp_path / "o", method="svd")
    with pytest.raises(QpeftError, match=r"recipe key method\.name: unknown method 'svd'"):
        method_plugin("svd", "recipe key method.name")


@pytest.mark.parametrize(("owner", "other"), list(itertools.permutations(METHODS, 2)))
def test_a_flag_of_another_method_is_one_line(tiny_model_dir, tmp_path, capsys, owner, other):
    plugin = METHODS[owner]
    parser = build_parser()
    for key, flag in plugin.flags.items():
        action = next(a for a in parser._subparsers._group_actions[0].choices["decompose"]._actions if a.dest == key)
        value = [] if action.nargs == 0 else [str(action.choices[0]) if action.choices else "1"]
        code, _, err = run(capsys, "decompose", str(tiny_model_dir), "--method", other, "--config", "nf3", flag,
                           *value, "--out", str(tmp_path / "o"))  # fmt: skip
        assert_one_line_error(code, err, f"{flag} is for --method {owner} only, not {other}")
        assert not (tmp_path / "o").exists()


def test_options_of_another_method_are_refused_by_the_api(tmp_path):
    first, second = list(METHODS.values())[:2]
    with pytest.raises(QpeftError, match=f"--method {first.name} takes {first.options.__name__}"):
        DecomposeRequest(None, tmp_path / "o", method=first.name, options=second.options())

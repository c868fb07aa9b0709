"""config.py, the torch-free ground floor: field types from the real type hints, range texts a person can type,
short help texts, DataConfig's facts taken from TrainConfig, and no import of the floors above it."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from allconv_cli import config
from allconv_cli.config import SEED_MAX, DataConfig, Spec, TrainConfig
from allconv_cli.errors import AllconvError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_range_texts_print_whole_numbers_in_full() -> None:
    assert config.spec("seed").bounds_text() == f"in [0, {SEED_MAX}]" == "in [0, 4294967295]"
    with pytest.raises(AllconvError) as err:
        TrainConfig(seed=SEED_MAX + 1)
    assert str(err.value) == "seed=4294967296: must be in [0, 4294967295]"
    assert config.spec("dropout_input").bounds_text() == "in [0, 1)"
    assert config.spec("lr").bounds_text() == "> 0" and config.spec("batch_size").bounds_text() == ">= 1"
    assert Spec(help="", group="data", low=0.5, high=1e-7 * 3).bounds_text() == "in [0.5, 3e-07]"
    assert Spec(help="", group="data", high=2.5, high_open=True).bounds_text() == "< 2.5"


def test_field_types_come_from_the_real_type_hints() -> None:
    """Every field's (base type, optional) is its annotation's, and the text form reads as the annotation."""
    for f in dataclasses.fields(TrainConfig):
        base, optional = config.field_type(f.name)
        assert config.FIELD_TYPES[f.name] == f.type  # the source text, e.g. "int | None"
        assert optional == f.type.endswith("| None")
        assert base.__name__ == f.type.split("[")[0].split(" ")[0]
    assert config.field_type("milestones") == (tuple, True) and config.field_type("lr") == (float, False)


def test_params_round_trip_through_the_types() -> None:
    cfg = TrainConfig(model="B", bn=True, lr=0.125, epochs=7, milestones=(2, 5), subset=300, data_dir="/d",
                      head_relu=False, test_size=None)
    params = cfg.to_params()
    assert TrainConfig.from_params(params) == cfg
    assert TrainConfig.from_params({**params, "lr_milestones": "[1]"}) == cfg  # derived params are not fields


def test_a_stored_config_with_an_unknown_key_is_refused() -> None:
    """No retired-field shim at 0.1: a key TrainConfig does not have is named, with the allowed ones."""
    with pytest.raises(AllconvError, match=r"unknown config keys \['extra'\]"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "extra": "x"})


def test_help_texts_say_what_an_option_does_briefly() -> None:
    """Measured notes belong in docs/protocol.md, not in --help."""
    for name in config.FIELD_NAMES:
        assert len(config.spec(name).help) <= 240, name


def test_data_config_takes_trainconfigs_defaults_and_values() -> None:
    shared = config.DATA_CONFIG_FIELDS
    assert set(shared) == {"dataset", "data_dir", "subset", "val_size", "test_size", "preprocess", "seed"}
    assert all(getattr(DataConfig(), name) == config.default(name) for name in shared)
    cfg = TrainConfig(dataset="fake", subset=500, val_size=100, test_size=50, preprocess="none", seed=9,
                      data_dir="/data")
    assert {name: getattr(cfg.data_config(), name) for name in shared} == {name: getattr(cfg, name) for name in shared}
    with pytest.raises(AllconvError, match="dataset='mnist': choose one of cifar10, cifar100, fake"):
        DataConfig(dataset="mnist")


def test_the_ground_floor_imports_nothing_above_it() -> None:
    """config.py (with paper.py and errors.py below it) imports no other allconv module, and loading it loads
    neither torch nor the data package."""
    for module in ("config", "paper", "errors"):
        tree = ast.parse((ROOT / "allconv_cli" / f"{module}.py").read_text())
        ours = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("allconv_cli")}
        ours |= {f"allconv_cli.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and node.module == "allconv_cli" for alias in node.names}
        assert ours <= {"allconv_cli", "allconv_cli.paper", "allconv_cli.errors"}, (module, ours)
    code = "import sys, allconv_cli.config; print(sorted(m for m in sys.modules if m in ('torch', 'allconv_cli.data')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"

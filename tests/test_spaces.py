"""Search spaces: every shipped file is valid, every bad file is one clear line, dependencies and grids work."""

from __future__ import annotations

import itertools
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from allconv_cli import spaces
from allconv_cli.cli import main
from allconv_cli.config import TrainConfig
from allconv_cli.search import make_sampler
from allconv_cli.spaces import SpaceError

optuna.logging.set_verbosity(optuna.logging.WARNING)
PAPER_LRS = {0.25, 0.1, 0.05, 0.01}


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("name", ["default", "paper", "bn-dropout", "optimizer"])
def test_shipped_spaces_are_valid_and_described(name: str) -> None:
    assert name in spaces.shipped_names()
    space = spaces.load(name)
    assert space.description and "\n" not in space.description
    assert space.source.endswith(f"search_spaces/{name}.yaml")
    assert Path(space.source).is_file(), "shipped inside the package"
    # every fixed value and every choice makes a valid config
    base = TrainConfig(**space.fixed).to_dict()
    for field_name, param in space.params.items():
        assert field_name in base
        if param.dist is not None and param.dist.kind == "categorical":
            for choice in param.dist.choices:
                TrainConfig(**{**base, field_name: choice})


def test_default_space_has_the_issue_parameters() -> None:
    space = spaces.load("default")
    assert space.sampler == "tpe"
    assert {"lr", "optimizer", "dropout_input", "dropout_hidden", "bn", "weight_decay", "batch_size"} <= set(
        space.params)
    lr = space.params["lr"]
    assert lr.depends_on == "optimizer" and set(lr.cases) == {"sgd", "adam"}
    assert all(c.log for c in lr.cases.values()), "lr is log-uniform"
    assert space.params["weight_decay"].dist.log


def ask_all(space: spaces.SearchSpace, sampler: optuna.samplers.BaseSampler, n: int,
            base: dict | None = None) -> list[tuple[dict, dict]]:
    """Sample ``n`` trials in memory; returns (config values, Optuna params) per trial."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    base = base or TrainConfig(**space.fixed).to_dict()
    out = []
    for _ in range(n):
        trial = study.ask()
        values = space.sample(trial, base)
        study.tell(trial, 0.5)
        out.append((values, trial.params))
    return out


def test_dependent_lr_range_follows_the_optimizer() -> None:
    space = spaces.load("default")
    draws = ask_all(space, optuna.samplers.RandomSampler(seed=3), 40)
    seen = set()
    for values, params in draws:
        seen.add(values["optimizer"])
        if values["optimizer"] == "sgd":
            assert 0.005 <= values["lr"] <= 0.5
            assert "lr.sgd" in params and "lr.adam" not in params
        else:
            assert 1e-5 <= values["lr"] <= 1e-2
            assert "lr.adam" in params and "lr.sgd" not in params
        assert values["batch_size"] in (64, 128, 256)
        assert 0.0 <= values["dropout_input"] <= 0.4
    assert seen == {"sgd", "adam"}


def test_dependent_on_a_value_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "dep.yaml"
    path.write_text("params:\n  lr:\n    type: float\n    log: true\n    depends_on: optimizer\n    cases:\n"
                    "      sgd: {low: 0.01, high: 0.1}\n      adam: {low: 1e-4, high: 1e-3}\n")
    space = spaces.load(str(path))
    base = TrainConfig(optimizer="adam").to_dict()
    space.check_base(base)
    for values, params in ask_all(space, optuna.samplers.RandomSampler(seed=0), 10, base):
        assert 1e-4 <= values["lr"] <= 1e-3 and list(params) == ["lr.adam"]
    with pytest.raises(SpaceError, match="depends on optimizer, which is nesterov here"):
        space.check_base(TrainConfig(optimizer="nesterov").to_dict())


@pytest.mark.parametrize(("name", "size"), [("paper", 4), ("bn-dropout", 4), ("optimizer", 8)])
def test_grid_spaces_enumerate_exactly(name: str, size: int) -> None:
    space = spaces.load(name)
    assert space.sampler == "grid" and space.grid_size() == size
    draws = ask_all(space, make_sampler(space, seed=0), size)  # the sampler `allconv search` uses
    combos = {tuple(sorted(values.items())) for values, _ in draws}
    assert len(combos) == size, "every grid point exactly once"
    if name == "paper":
        assert {values["lr"] for values, _ in draws} == PAPER_LRS
        assert space.fixed["optimizer"] == "sgd" and space.fixed["momentum"] == 0.9
        assert space.fixed["weight_decay"] == 0.001 and space.fixed["bn"] is False
    if name == "bn-dropout":
        got = {(v["bn"], v["dropout_input"], v["dropout_hidden"]) for v, _ in draws}
        assert got == {(bn, di, dh) for bn in (False, True) for di, dh in ((0.0, 0.0), (0.2, 0.5))}
    if name == "optimizer":
        got = {(v["optimizer"], v["lr"]) for v, _ in draws}
        assert got == set(itertools.product(("sgd", "adam"), PAPER_LRS))


def test_yaml_numbers_without_a_dot_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("fixed: {weight_decay: 5e-4}\nparams:\n  lr: {type: float, low: 1e-4, high: 1e-1, log: true}\n")
    space = spaces.load(str(path))
    assert space.fixed["weight_decay"] == 5e-4
    assert space.params["lr"].dist.low == 1e-4


BAD = {
    "unknown_top_key": ("sampler: tpe\nparms: {}\n", ["unknown key 'parms'", "did you mean params", "allowed are"]),
    "bad_range": ("params:\n  lr: {type: float, low: 0.5, high: 0.1}\n", ["params.lr", "low 0.5 >= high 0.1"]),
    "log_needs_positive": ("params:\n  lr: {type: float, low: 0, high: 0.1, log: true}\n",
                           ["params.lr.low", "log", "low > 0"]),
    "misspelled_param": ("params:\n  dropout_hiden: {type: float, low: 0.1, high: 0.5}\n",
                         ["dropout_hiden", "did you mean dropout_hidden", "allowed are", "lr"]),
    "misspelled_fixed": ("fixed:\n  momentun: 0.9\n", ["fixed", "momentun", "did you mean momentum"]),
    "yaml_syntax": ("params:\n  lr: {type: float, low: [0.1, high: 0.2}\n", ["not valid YAML", "line 2"]),
    "unknown_dist_key": ("params:\n  lr: {type: float, low: 0.01, high: 0.1, logg: true}\n",
                         ["params.lr", "unknown key 'logg'", "did you mean log"]),
    "bad_sampler": ("sampler: bayes\n", ["sampler 'bayes'", "tpe, random, grid"]),
    "bad_choice": ("params:\n  optimizer: {type: categorical, choices: [sgd, rmsprop]}\n",
                   ["params.optimizer.choices", "rmsprop", "sgd, nesterov, adam, adamw"]),
    "missing_case": ("params:\n  optimizer: {type: categorical, choices: [sgd, adam]}\n  lr:\n    type: float\n"
                     "    depends_on: optimizer\n    cases: {sgd: {low: 0.01, high: 0.1}}\n",
                     ["params.lr.cases", "no case for optimizer=adam"]),
    "grid_needs_choices": ("sampler: grid\nparams:\n  lr: {type: float, low: 0.01, high: 0.1}\n",
                           ["params.lr", "grid", "categorical"]),
    "type_mismatch": ("params:\n  batch_size: {type: float, low: 32, high: 256}\n",
                      ["params.batch_size.type", "int or categorical"]),
    "bad_type": ("params:\n  lr: {type: uniform, low: 0.01, high: 0.1}\n", ["params.lr.type", "'uniform'"]),
    "negative_lr_fixed": ("fixed: {lr: -1}\n", ["fixed.lr", "must be > 0"]),
    "not_a_mapping": ("- lr\n- bn\n", ["must be a mapping"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_space_is_one_line_naming_file_and_key(case: str, tmp_path: Path) -> None:
    text, expected = BAD[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as info:
        spaces.load(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize("case", ["misspelled_param", "yaml_syntax", "bad_range"])
def test_bad_space_on_the_command_line_exits_2_with_one_line(case: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(BAD[case][0])
    code, _, err = run_cli("search", "--dataset", "fake", "--space", str(path))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: space ") and str(path) in lines[0], err
    assert not (tmp_path / "optuna.db").exists(), "validated before any study is created"


def test_unknown_space_name_and_missing_file() -> None:
    code, _, err = run_cli("search", "--space", "papr")
    assert code == 2 and "unknown search space 'papr' (did you mean paper?)" in err
    code, _, err = run_cli("search", "--space", "nowhere/space.yaml")
    assert code == 2 and "nowhere/space.yaml does not exist" in err and len(err.strip().splitlines()) == 1


def test_spaces_command_lists_and_shows() -> None:
    code, out, _ = run_cli("spaces")
    assert code == 0
    for name in ("default", "paper", "bn-dropout", "optimizer"):
        assert name in out
    assert "grid" in out and "tpe" in out
    code, out, _ = run_cli("spaces", "show", "paper")
    assert code == 0 and "sampler: grid" in out and "[0.25, 0.1, 0.05, 0.01]" in out
    code, _, err = run_cli("spaces", "show", "nope")
    assert code == 2 and err.startswith("Error: unknown search space 'nope'")

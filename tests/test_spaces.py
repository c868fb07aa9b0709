"""Search spaces: every shipped file is valid, every bad file is one clear line, dependencies and grids work."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from allconv_cli import space_files, spaces
from allconv_cli.cli import main
from allconv_cli.config import TrainConfig
from allconv_cli.search.distinct import make_sampler
from allconv_cli.spaces import SpaceError

pytestmark = pytest.mark.unit

optuna.logging.set_verbosity(optuna.logging.WARNING)
PAPER_LRS = {0.25, 0.1, 0.05, 0.01}


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("name", ["default", "paper", "bn-dropout", "optimizer"])
def test_shipped_spaces_are_valid_and_described(name: str) -> None:
    assert name in space_files.shipped_names()
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


# ---------------------------------------------------------------------------------------------------------------
# the user's ./search_spaces folder (in the working directory, next to mlruns/) before the shipped spaces

MINE = "description: my lr range\nsampler: random\nparams:\n  lr: {type: float, low: 0.02, high: 0.2, log: true}\n"


@pytest.fixture
def userdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, as a user's project folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_local_space_is_found_first_and_shadows_a_shipped_name(userdir: Path) -> None:
    (userdir / "search_spaces").mkdir()
    (userdir / "search_spaces" / "mine.yaml").write_text(MINE)
    (userdir / "search_spaces" / "paper.yaml").write_text(MINE.replace("my lr range", "my paper"))
    mine = spaces.load("mine")
    assert mine.name == "mine" and mine.source == "search_spaces/mine.yaml" and mine.description == "my lr range"
    assert spaces.load("paper").description == "my paper", "the local file shadows the shipped name"
    assert spaces.load("default").source == str(space_files.shipped_dir() / "default.yaml"), "shipped ones still work"
    assert spaces.load("search_spaces/mine.yaml").sha == mine.sha, "a path still works"
    code, out, _ = run_cli("spaces", "show", "mine")
    assert code == 0 and out.startswith("# search_spaces/mine.yaml\n") and "low: 0.02" in out


def test_search_uses_the_local_space_and_checks_it_first(userdir: Path) -> None:
    (userdir / "search_spaces").mkdir()
    (userdir / "search_spaces" / "mine.yaml").write_text(BAD["misspelled_param"][0])
    code, _, err = run_cli("search", "--dataset", "fake", "--space", "mine")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "space search_spaces/mine.yaml" in lines[0] and "dropout_hiden" in lines[0], err
    assert sorted(p.name for p in userdir.iterdir()) == ["search_spaces"], "nothing created"


def test_spaces_lists_local_and_shipped_and_notes_shadowing(userdir: Path) -> None:
    code, out, _ = run_cli("spaces")
    assert code == 0 and "where" in out and "local" not in out.replace("./search_spaces", "")
    assert "allconv spaces copy NAME" in out, "says where one's own spaces go"
    (userdir / "search_spaces").mkdir()
    (userdir / "search_spaces" / "mine.yaml").write_text(MINE)
    (userdir / "search_spaces" / "paper.yaml").write_text(MINE)
    (userdir / "search_spaces" / "broken.yaml").write_text(BAD["bad_range"][0])
    code, out, _ = run_cli("spaces")
    assert code == 0, out
    rows = {tuple(cell.strip() for cell in line.split("│")[1:3]) for line in out.splitlines() if "│" in line}
    assert {("mine", "local"), ("paper", "local"), ("paper", "shipped (shadowed)"), ("default", "shipped"),
            ("broken", "local")} <= rows
    assert "note: search_spaces/paper.yaml shadows the shipped space paper: --space paper uses the local file" in out
    assert len([line for line in out.splitlines() if line.startswith("note:")]) == 1, "only paper is shadowed"
    assert "invalid:" in out, "a broken local file is listed with its reason"


def test_copy_writes_a_shipped_space_and_never_overwrites_without_force(userdir: Path) -> None:
    code, out, err = run_cli("spaces", "copy", "optimizer")
    assert code == 0, err
    target = userdir / "search_spaces" / "optimizer.yaml"
    assert target.read_text() == Path(spaces.load("optimizer").source).read_text()
    assert "search_spaces/optimizer.yaml" in out
    assert spaces.load("optimizer").source == "search_spaces/optimizer.yaml", "--space optimizer now uses the copy"
    target.write_text(MINE)
    code, _, err = run_cli("spaces", "copy", "optimizer")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "search_spaces/optimizer.yaml already exists" in err and "--force" in err
    assert target.read_text() == MINE, "left alone"
    code, _, err = run_cli("spaces", "copy", "optimizer", "--force")
    assert code == 0 and target.read_text() != MINE


@pytest.mark.parametrize("name", ["optimiser", "my/space.yaml", "nothing"])
def test_copy_of_an_unknown_name_is_one_line_and_creates_nothing(name: str, userdir: Path) -> None:
    code, _, err = run_cli("spaces", "copy", name)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"no shipped search space {name!r}" in err and "bn-dropout, default, optimizer, paper" in err
    if name == "optimiser":
        assert "(did you mean optimizer?)" in err
    assert not list(userdir.iterdir())


def test_unknown_name_lists_local_and_shipped_spaces(userdir: Path) -> None:
    (userdir / "search_spaces").mkdir()
    (userdir / "search_spaces" / "mine.yaml").write_text(MINE)
    with pytest.raises(SpaceError) as info:
        spaces.load("mien")
    message = str(info.value)
    assert "unknown search space 'mien' (did you mean mine?)" in message
    assert "in ./search_spaces: mine; shipped: bn-dropout, default, optimizer, paper" in message


def test_console_script_in_a_fresh_folder(tmp_path: Path) -> None:
    """The installed entry point, from another working directory: copy, then show what --space would load."""
    code = "from allconv_cli.cli import main; main()"
    run = [sys.executable, "-c", code]
    copied = subprocess.run([*run, "spaces", "copy", "paper"], cwd=tmp_path, capture_output=True, text=True)
    assert copied.returncode == 0, copied.stderr
    shown = subprocess.run([*run, "spaces", "show", "paper"], cwd=tmp_path, capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.startswith("# search_spaces/paper.yaml\n"), shown.stderr
    assert (tmp_path / "search_spaces" / "paper.yaml").is_file()

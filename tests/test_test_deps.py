"""``scripts/test-deps.sh``, which `make test` and `.ci/run` run first: it installs the Debian packages the suite needs
when they are missing, says what it did and how long it took, and names what it cannot do.

Run in a copy of the repository's layout with a PATH of stubs: ``apt-get`` and ``sudo`` record their arguments,
``id`` says who runs it, and the programs the suite needs are there or not as each test wants.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
BASICS = ("dirname", "date", "ls", "cat")  # what the script itself runs, with python3
SUITE = ("initdb", "chromium", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged")


def layout(tmp_path: Path, *, cifar: bool, present: tuple[str, ...], uid: int = 0,
           sudo: bool = False) -> dict[str, str]:
    """``tmp_path/repo/scripts/test-deps.sh`` (with ``tmp_path/shared/data/cifar10`` if ``cifar``) and the env to run it
    with: PATH holds only the basics, the ``present`` programs and the stubs."""
    (tmp_path / "repo" / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "test-deps.sh", tmp_path / "repo" / "scripts")
    if cifar:
        data = tmp_path / "shared" / "data" / "cifar10"
        data.mkdir(parents=True)
        for name in ("train_1.npz", "test.npz"):
            (data / name).touch()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in BASICS:
        (bin_dir / name).symlink_to(shutil.which(name))
    (bin_dir / "python3").symlink_to(Path(sys.base_prefix) / "bin" / "python3")  # not a venv's, not a pyenv shim
    stubs = {name: "#!/bin/sh\nexit 0\n" for name in present}
    stubs["docker"] = '#!/bin/sh\n[ "$1" = compose ] && exit 1\nexit 0\n'  # an engine without the compose plugin
    stubs["id"] = f"#!/bin/sh\necho {uid}\n"
    stubs["apt-get"] = f'#!/bin/sh\necho "apt-get $*" >> {tmp_path}/calls\n'
    if sudo:
        stubs["sudo"] = f'#!/bin/sh\necho "sudo $1" >> {tmp_path}/calls\nexec "$@"\n'
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {"PATH": str(bin_dir), "PG_BIN": str(tmp_path / "no-postgres"), "HOME": str(tmp_path)}


def run(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([shutil.which("bash"), str(tmp_path / "repo" / "scripts" / "test-deps.sh"), *args],
                          env=env, capture_output=True, text=True, timeout=60)


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_installs_what_is_missing_and_says_how_long_it_took(tmp_path: Path) -> None:
    env = layout(tmp_path, cifar=True, present=("initdb", "chromium"))
    out = run(tmp_path, env)
    assert out.returncode == 0, out.stdout + out.stderr
    # PG_BIN names a folder without initdb: the server counts as missing even with an initdb on PATH
    assert calls(tmp_path) == ["apt-get update -qq",
                               "apt-get install -y -qq --no-install-recommends postgresql slurm-wlm munge"]
    assert "installing postgresql slurm-wlm munge (apt-get)" in out.stdout
    assert "installed postgresql slurm-wlm munge in" in out.stdout and " s\n" in out.stdout


def test_nothing_missing_installs_nothing(tmp_path: Path) -> None:
    env = layout(tmp_path, cifar=True, present=SUITE)
    env.pop("PG_BIN")
    out = run(tmp_path, env)
    assert out.returncode == 0 and calls(tmp_path) == []
    assert out.stdout == "test-deps: suite: every package is there, nothing to install\n"


def test_goes_through_sudo_when_not_root(tmp_path: Path) -> None:
    env = layout(tmp_path, cifar=True, present=SUITE, uid=1000, sudo=True)
    out = run(tmp_path, env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert calls(tmp_path) == ["sudo apt-get", "apt-get update -qq", "sudo apt-get",
                               "apt-get install -y -qq --no-install-recommends postgresql"]
    assert "(apt-get through sudo)" in out.stdout


def test_says_what_it_cannot_do_and_which_tests_still_run(tmp_path: Path) -> None:
    env = layout(tmp_path, cifar=False, present=("chromium",), uid=1000)
    out = run(tmp_path, env)
    assert out.returncode == 1 and calls(tmp_path) == []
    lines = out.stdout.splitlines()
    assert lines[0] == "test-deps: cannot install postgresql slurm-wlm munge: not root and no sudo"
    assert lines[1].startswith("test-deps: cannot provide the real CIFAR-10 arrays the 'cifar' tests read, ")
    assert f"{tmp_path}/shared/data/cifar10/{{train_1,test}}.npz" in lines[1]
    assert lines[2] == "test-deps: the tests that need none of it: .venv/bin/python -m pytest -q -m " \
                       "'not services and not cifar'"


def test_docker_set_and_a_bad_set_name(tmp_path: Path) -> None:
    env = layout(tmp_path, cifar=False, present=())
    out = run(tmp_path, env, "docker")
    assert out.returncode == 0, out.stdout + out.stderr
    assert calls(tmp_path)[-1] == "apt-get install -y -qq --no-install-recommends docker-compose debootstrap"
    bad = run(tmp_path, env, "dockr")
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "test-deps: unknown set 'dockr': use 'suite' (the default) or 'docker'"
    assert os.path.exists(tmp_path / "calls")


def test_make_test_and_ci_use_this_script_and_no_other_package_list() -> None:
    """One list of the suite's packages: `make test` runs the script first, `.ci/run` runs `make test` and the
    script's docker set, and installs nothing itself."""
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: test-deps\b", makefile, re.M), "make test installs what it needs first"
    assert re.search(r"^test-deps:\n\tbash scripts/test-deps.sh$", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.split("#")[0].strip() for line in ci.splitlines() if line.split("#")[0].strip()]
    assert "make test" in commands and any(c.startswith("bash scripts/test-deps.sh docker") for c in commands)
    assert not any("apt-get" in c for c in commands), "the packages are installed by scripts/test-deps.sh only"

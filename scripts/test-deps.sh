#!/usr/bin/env bash
# What the test suite needs beyond .venv, installed when missing, for `make test` and `.ci/run` alike.
#
#   bash scripts/test-deps.sh          # what `make test` needs (it runs this first)
#   bash scripts/test-deps.sh docker   # what `make docker-test` needs
#
# The suite: the PostgreSQL server (tests/services.py starts a private cluster with initdb), Chromium (tests/test_ui.py
# renders MLflow's UI headless), SLURM and munge (tests/test_slurm.py starts a one-node cluster; the packages' own
# services are not used), and python3-venv for `make install`. Docker: docker.io, docker-compose, debootstrap.
# Missing Debian packages are installed with apt-get, as root or through sudo; the script says what it found, what it
# installed and how long that took. What it cannot do (no apt-get, no root and no sudo, the real CIFAR-10 arrays that
# no package holds) it names, with the command that runs the tests that need none of it, and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-suite}
say() { printf 'test-deps: %s\n' "$*"; }
has() { command -v "$1" >/dev/null 2>&1; }

missing=()
case "$mode" in
suite)
    python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    if [ -n "${PG_BIN:-}" ]; then
        [ -x "$PG_BIN/initdb" ] || missing+=(postgresql)
    elif ! has initdb && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        missing+=(postgresql)
    fi
    has chromium || has chromium-browser || missing+=(chromium)
    for b in slurmctld slurmd sbatch squeue scontrol scancel sinfo; do
        has "$b" || { missing+=(slurm-wlm); break; }
    done
    has munged || missing+=(munge)
    ;;
docker)
    has dockerd || has docker || missing+=(docker.io)
    has docker-compose || { has docker && docker compose version >/dev/null 2>&1; } || missing+=(docker-compose)
    has debootstrap || missing+=(debootstrap)
    ;;
*)
    say "unknown set '$mode': use 'suite' (the default) or 'docker'" >&2
    exit 2
    ;;
esac

cannot=()
if [ ${#missing[@]} -eq 0 ]; then
    say "$mode: every package is there, nothing to install"
else
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if has sudo; then sudo="sudo"; else cannot+=("install ${missing[*]}: not root and no sudo"); fi
    fi
    if ! has apt-get; then
        cannot=("install ${missing[*]}: no apt-get here (install them with this system's package manager)")
    fi
    if [ ${#cannot[@]} -eq 0 ]; then
        say "$mode: installing ${missing[*]} (apt-get${sudo:+ through sudo})..."
        started=$(date +%s)
        export DEBIAN_FRONTEND=noninteractive
        if $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        then
            say "$mode: installed ${missing[*]} in $(( $(date +%s) - started )) s"
        else
            cannot+=("install ${missing[*]}: apt-get failed after $(( $(date +%s) - started )) s (output above)")
        fi
    fi
fi

skip=()  # the markers of the tests that cannot run here
[ ${#cannot[@]} -eq 0 ] || skip+=(services)
if [ "$mode" = suite ]; then
    cifar="$(cd .. && pwd)/shared/data/cifar10"
    if [ ! -f "$cifar/train_1.npz" ] || [ ! -f "$cifar/test.npz" ]; then
        where="docs/development.md, \"Data for the tests\""
        cannot+=("provide the real CIFAR-10 arrays the 'cifar' tests read, $cifar/{train_1,test}.npz ($where)")
        skip+=(cifar)
    fi
fi

if [ ${#cannot[@]} -gt 0 ]; then
    for line in "${cannot[@]}"; do say "cannot $line"; done
    if [ "$mode" = suite ]; then
        expr="not ${skip[0]}${skip[1]:+ and not ${skip[1]}}"
        say "the tests that need none of it: .venv/bin/python -m pytest -q -m '$expr'"
    fi
    exit 1
fi

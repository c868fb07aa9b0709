"""Where search spaces live: ``./search_spaces/NAME.yaml`` (the user's own, next to ``mlruns/`` and ``optuna.db``, so a
project's spaces travel with its results) before the shipped ones (the repository's ``search_spaces/``, installed as
``allconv_cli.search_spaces``: read-only starting points, ``allconv spaces copy NAME``). Finding, listing, copying.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from allconv_cli.errors import AllconvError


class SpaceError(AllconvError):
    """A search space that cannot be found or used; the message names the file (or name) and the key."""


LOCAL_DIR = "search_spaces"


@dataclass(frozen=True)
class SpaceFile:
    """A space ``--space NAME`` can name: ``where`` is local or shipped; a local file may shadow a shipped one."""

    name: str
    path: Path
    where: str
    shadowed: bool = False  # a shipped space hidden by ./search_spaces/NAME.yaml


def shipped_dir() -> Path:
    """The repository's ``search_spaces/``, installed as the package ``allconv_cli.search_spaces``."""
    return Path(str(resources.files("allconv_cli.search_spaces")))


def local_dir() -> Path:
    """The user's own spaces, relative to the working directory (where mlruns/ and optuna.db are too)."""
    return Path(LOCAL_DIR)


def _yaml_stems(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml") if p.is_file())


def shipped_names() -> list[str]:
    return _yaml_stems(shipped_dir())


def local_names() -> list[str]:
    """The user's own spaces; none when ./search_spaces is the shipped folder itself (a run from the repository)."""
    folder = local_dir()
    if folder.is_dir() and folder.resolve() == shipped_dir().resolve():
        return []
    return _yaml_stems(folder)


def named_spaces() -> list[SpaceFile]:
    """Every named space, by name; a local one before the shipped one it shadows."""
    local = local_names()
    files = [SpaceFile(n, local_dir() / f"{n}.yaml", "local") for n in local]
    files += [SpaceFile(n, shipped_dir() / f"{n}.yaml", "shipped", n in local) for n in shipped_names()]
    return sorted(files, key=lambda f: (f.name, f.where))


def _known_names() -> str:
    local = local_names()
    return (f"in ./{LOCAL_DIR}: {', '.join(local)}; " if local else "") + f"shipped: {', '.join(shipped_names())}"


def did_you_mean(name: str, names: list[str]) -> str:
    hint = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {hint[0]}?)" if hint else ""


def _looks_like_path(name_or_path: str) -> bool:
    return name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path or "\\" in name_or_path


def resolve(name_or_path: str) -> Path:
    """``./search_spaces/NAME.yaml``, else the shipped NAME; a file path (a ``/`` or ``.yaml``/``.yml``) as it is."""
    if _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise SpaceError(f"search space file {name_or_path} does not exist: pass a .yaml file or a space name "
                             f"({_known_names()})")
        return path
    for folder in (local_dir(), shipped_dir()):
        if (folder / f"{name_or_path}.yaml").is_file():
            return folder / f"{name_or_path}.yaml"
    raise SpaceError(f"unknown search space {name_or_path!r}"
                     f"{did_you_mean(name_or_path, local_names() + shipped_names())}: known spaces are "
                     f"{_known_names()}; or pass a path to a .yaml file")


def copy_shipped(name: str, *, force: bool = False) -> Path:
    """Write the shipped space ``name`` to ``./search_spaces/NAME.yaml``, a start for one's own; never overwrites
    unless ``force``."""
    source = shipped_dir() / f"{name}.yaml"
    if _looks_like_path(name) or not source.is_file():
        raise SpaceError(f"no shipped search space {name!r}{did_you_mean(name, shipped_names())}: copy one of "
                         f"{', '.join(shipped_names())}")
    target = local_dir() / f"{name}.yaml"
    if target.exists() and not force:
        raise SpaceError(f"{target} already exists: edit it, or pass --force to overwrite it with the shipped {name}")
    try:
        target.parent.mkdir(exist_ok=True)
        target.write_text(source.read_text())
    except OSError as exc:
        raise SpaceError(f"cannot write {target}: {exc.strerror}") from None
    return target

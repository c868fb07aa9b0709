"""The one message for an unknown dataset, preprocessing or augmentation name: the bad value, the allowed ones and the
flag that sets it, so a library caller and a CLI user read the same fix."""

from __future__ import annotations

from allconv_cli.errors import AllconvError


def unknown_choice_message(name: str, value: str, allowed: tuple[str, ...], flag: str) -> str:
    return f"unknown {name} {value!r}: pass {flag} with one of {', '.join(allowed)}"


def check_choice(name: str, value: str, allowed: tuple[str, ...], flag: str) -> None:
    """Raise :class:`AllconvError` with :func:`unknown_choice_message` unless ``value`` is in ``allowed``."""
    if value not in allowed:
        raise AllconvError(unknown_choice_message(name, value, allowed, flag))

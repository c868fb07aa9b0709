"""allconv: the All Convolutional Net (Springenberg et al., 2015), reproduced and searched.

Importing this package is cheap on purpose: ``allconv --help`` must not pay for torch or timm. The twelve
networks are registered with timm as soon as timm is (or has been) imported, see :mod:`allconv_cli._timm_hook`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from allconv_cli._timm_hook import install as _install_timm_hook

_install_timm_hook()

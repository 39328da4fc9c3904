"""The SAE architectures by name: the one table that ``SAEConfig`` validation, ``build_sae`` and the
dictionary loader look names up in.

An entry maps a name (``sae.architecture``) to the ``"module:Class"`` that defines it, a subclass
of ``trainer.sae.SparseCoder``; the module is imported on first use. ``sae.architecture`` may
also be such a path itself, for an architecture defined outside saeforge: every process that
builds it (each Ray Train worker) imports it by that path, so nothing has to be registered in
each process first. Adding an architecture is its class and its ``conf/sae/<name>.yaml``
(plus its line here for one that ships with saeforge).

No torch here: composing and validating a config must stay cheap (only
``check_transcoder_architecture`` on a ``"module:Class"`` path imports that class, to read it).
"""

from __future__ import annotations

import importlib
from typing import Any

BUILTIN_ARCHITECTURES = {
    "topk": "trainer.sae:TopKSAE",
    "batchtopk": "trainer.architectures:BatchTopKSAE",
    "matryoshka_batchtopk": "trainer.architectures:MatryoshkaBatchTopKSAE",
    "jumprelu": "trainer.architectures:JumpReLUSAE",
    "relu_l1": "trainer.architectures:ReLUSAE",
    "relu_l1_unitnorm": "trainer.architectures:UnitNormReLUSAE",
}
"""Name -> ``"module:Class"`` of the architectures saeforge ships."""

ARCHITECTURES = tuple(BUILTIN_ARCHITECTURES)
"""The names of the architectures saeforge ships, in the order the docs list them."""

TRANSCODER_ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu_l1", "relu_l1_unitnorm")
"""The built-in architectures that can be trained as transcoders (``SparseCoder.transcoder_capable``):
all but ``matryoshka_batchtopk``."""


def check_architecture(name: str, *, setting: str = "sae.architecture") -> None:
    """Raise ValueError unless ``name`` is a built-in architecture or a ``"module:Class"`` path
    (whose import is left to the process that builds it)."""
    if name in BUILTIN_ARCHITECTURES or _is_import_path(name):
        return
    raise ValueError(
        f"{setting}={name!r}: expected one of {list(ARCHITECTURES)} or a 'package.module:Class' path"
    )


def check_transcoder_architecture(name: str, *, setting: str = "sae.architecture") -> None:
    """Raise ValueError unless ``name`` (checked as ``check_architecture`` does) can be a
    transcoder: a name in ``TRANSCODER_ARCHITECTURES``, or a ``"module:Class"`` path whose class,
    imported now, is ``transcoder_capable``."""
    check_architecture(name, setting=setting)
    if name in TRANSCODER_ARCHITECTURES:
        return
    if name in BUILTIN_ARCHITECTURES:
        raise ValueError(
            f"{setting}={name!r} cannot be a transcoder: expected one of {list(TRANSCODER_ARCHITECTURES)} "
            "or a 'package.module:Class' path of a transcoder_capable class"
        )
    if not getattr(architecture_class(name), "transcoder_capable", False):
        raise ValueError(f"{setting}={name!r} cannot be a transcoder: its class sets transcoder_capable=False")


def architecture_class(name: str) -> Any:
    """The ``SparseCoder`` subclass that ``name`` (a built-in name or a ``"module:Class"`` path)
    stands for, its module imported now."""
    check_architecture(name, setting="architecture")
    path = BUILTIN_ARCHITECTURES.get(name, name)
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"architecture={name!r}: cannot import {module_name!r} ({err})") from None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"architecture={name!r}: {module_name!r} has no {qualname!r}")
    from trainer.sae import SparseCoder

    if not (isinstance(obj, type) and issubclass(obj, SparseCoder)):
        raise ValueError(f"architecture={name!r}: {path} is not a trainer.sae.SparseCoder subclass")
    return obj


def _is_import_path(name: str) -> bool:
    module_name, colon, qualname = name.partition(":")
    parts = [*module_name.split("."), *qualname.split(".")]
    return bool(colon) and all(part.isidentifier() for part in parts)

"""Option groups: a config node read into a frozen dataclass, key by key (``k3lab.stages.options``,
``k3lab.data.options``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

G = TypeVar("G")


def group_of(cls: type[G], value: G | Mapping[str, Any] | None, name: str) -> G:
    """``value`` as the option group ``cls``: an instance is kept, a mapping is checked key by key, None is the
    defaults. ``name`` (``stage.optim``) prefixes every error."""
    assert is_dataclass(cls), cls
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}: expected a mapping of options, got {type(value).__name__} ({value!r})")
    known = [f.name for f in fields(cls)]
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise ValueError(f"{name}: unknown keys {unknown}; known: {known}")
    try:
        return cls(**{str(k): value[k] for k in value})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from e


def plain_dict(node: Any, name: str) -> dict[str, Any]:
    """A config node (DictConfig, mapping or None) as a plain, resolved dict; anything else is an error naming
    ``name``."""
    from omegaconf import DictConfig, OmegaConf

    if node is None:
        return {}
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, Mapping):
        raise ValueError(f"{name}: expected a mapping, got {type(node).__name__} ({node!r})")
    return {str(k): v for k, v in node.items()}

"""``compat=official``: the values the authors' released code uses, each with its source (docs/methods.md
"Recipes behind the published numbers"): a method's ``official`` map and each preset file's ``official:`` block."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rayexperts.config.layers import Layer, provenance
from rayexperts.config.presets import preset_chain
from rayexperts.errors import ConfigError
from rayexperts.registry import METHODS


@dataclass(frozen=True)
class OfficialValue:
    """One recipe item of ``compat=official``: the value the authors' released code uses and where it is."""

    value: Any
    source: str  # repository@commit:path:lines, as docs/methods.md "Recipes behind the published numbers" gives it
    status: str = ""  # A (moves accuracy beyond seed noise), B (small), P (the code differs from the paper's text)
    item: str = ""  # the recipe item, as docs/methods.md's table names it

    def describe(self) -> str:
        return self.source + (f" ({self.status})" if self.status else "")


def _official_block(block: Mapping[str, Any], where: str) -> dict[str, OfficialValue]:
    out = {}
    for key, entry in block.items():
        if not isinstance(entry, Mapping) or "value" not in entry or not entry.get("source"):
            raise ConfigError(f"{where}: official.{key} must be {{value: ..., source: ..., status: A|B|P}}")
        extra = set(entry) - {"value", "source", "status", "item"}
        if extra:
            raise ConfigError(f"{where}: official.{key} has unknown field(s) {', '.join(sorted(extra))}")
        if entry.get("status", "") not in ("", "A", "B", "P"):
            raise ConfigError(f"{where}: official.{key}.status must be A, B or P, got {entry['status']!r}")
        out[str(key)] = OfficialValue(entry["value"], str(entry["source"]), str(entry.get("status", "")),
                                      str(entry.get("item", "")))
    return out


def method_official(method: str) -> dict[str, OfficialValue]:
    """What ``compat=official`` switches for ``method`` wherever it runs (its ``official`` map:
    key → (value, source))."""
    found = getattr(METHODS.get(method), "official", {}) or {}
    return {k: v if isinstance(v, OfficialValue) else OfficialValue(*v) for k, v in found.items()}


def official_values(name_or_path: str | None, method: str) -> list[tuple[str, dict[str, OfficialValue]]]:
    """The ``compat=official`` layers, in merge order: the method's, then each file of the preset's chain."""
    out = [(f"compat official ({method})", method_official(method))]
    if name_or_path:
        for source, _, block in preset_chain(str(name_or_path)):
            if block:
                out.append((f"compat official ({source})", _official_block(block, source)))
    return out


def official_sources(layers: Sequence[Layer],
                     official: list[tuple[str, dict[str, OfficialValue]]]) -> dict[str, str]:
    """For every key whose final value an official layer set (no later layer changed it): its source."""
    last = provenance(layers)
    return {key: value.describe() for name, values in official for key, value in values.items()
            if last.get(key) == name}

"""Reading a recipe's YAML strictly and cheaply.

A recipe is a few hundred bytes of settings, so the reader refuses what no recipe needs before it
costs anything: a file over MAX_BYTES (read no further), aliases that expand to more than
MAX_EXPANDED values (a 300-byte "billion laughs" file of nested aliases expanded to gigabytes in
the error message that printed it; counted on the composed nodes, before anything is built), nesting deeper than MAX_DEPTH (5000 nested lists hit Python's recursion limit), and
the same key twice in one mapping (YAML would keep the last one silently).
"""
from __future__ import annotations

from pathlib import Path

import yaml
from yaml.nodes import MappingNode

from sqexport.contracts.errors import ConfigError, first_line
from sqexport.contracts.files import read_regular_bytes

__all__ = ["read_recipe_yaml", "MAX_BYTES", "MAX_EXPANDED", "MAX_DEPTH"]

MAX_BYTES = 1 << 20
MAX_EXPANDED = 100_000  # values + characters alias uses add; a whole real recipe is ~1,000
MAX_DEPTH = 64
_MERGE = "tag:yaml.org,2002:merge"


class _Refused(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader plus the limits in the module docstring (counted while composing, before any
    Python object is built)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._expanded = 0
        self._weights: dict[int, int] = {}

    def _weight(self, node) -> int:
        """Values `node` stands for once every alias inside it is expanded (memoized per node,
        so a chain of aliases costs one pass)."""
        known = self._weights.get(id(node))
        if known is None:
            if isinstance(node, MappingNode):
                known = 1 + sum(self._weight(k) + self._weight(v) for k, v in node.value)
            elif isinstance(node.value, list):
                known = 1 + sum(self._weight(v) for v in node.value)
            else:  # a scalar: its characters count (an alias to a long string is as costly)
                known = 1 + len(node.value)
            self._weights[id(node)] = known
        return known

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor
            if anchor in self.anchors:
                self._expanded += self._weight(self.anchors[anchor])
                if self._expanded > MAX_EXPANDED:
                    raise _Refused(f"its aliases (*name) expand to more than {MAX_EXPANDED:,} values and characters")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:  # `<<: *base` may be overridden on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeLoader reports it itself
                    continue
                if duplicate:
                    line = key_node.start_mark.line + 1
                    raise _Refused(f"key {str(key)[:40]!r} appears twice in one mapping (line {line})")
        return super().construct_mapping(node, deep)


def read_recipe_yaml(path: Path):
    """The parsed YAML of a recipe file (a regular file, see contracts/files.py), or ConfigError."""
    data = read_regular_bytes(Path(path), "recipe", ConfigError, limit=MAX_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not UTF-8 text") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except _Refused as exc:
        raise ConfigError(f"recipe {path} refused: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {first_line(exc)[:200]}") from None
    except RecursionError:  # a limit above should have caught it first
        raise ConfigError(f"recipe {path} is nested too deeply") from None

"""Reading configs: strict YAML (`base:` inheritance, no duplicate keys), `key=value` overrides, dict <-> Config.

Loading is strict: an unknown key is a `ConfigError` that suggests the closest valid key, and a wrong
type or a value out of range names the dotted key and the file.

YAML note: PyYAML follows YAML 1.1, where `3e-4` (no dot) is a string. We read it as a float, as
YAML 1.2 and Python do, so `lr: 3e-4` and the override `optim.lr=3e-4` both work.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from megalm.config.fields import ConfigError, _coerce, _describe, _field_types
from megalm.config.sections import _SECTIONS, Config


# ---- YAML ----------------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (`1e-4`) as floats."""


# Copy the resolver lists so that adding ours does not change yaml.SafeLoader for everyone else.
_YamlLoader.yaml_implicit_resolvers = {
    first_char: list(resolvers)
    for first_char, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping names one key twice (PyYAML would silently keep the last value)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    """Construct a mapping, refusing a key given twice: the first value would be silently ignored."""
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key; construct_mapping reports it
            continue
        if first is not None:
            raise _DuplicateKeyError(
                f"key {key!r} is given twice, on line {first.start_mark.line + 1} and line "
                f"{key_node.start_mark.line + 1}; keep one of them"
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=True)


_YamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKeyError as error:
        raise ConfigError(f"{source}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"cannot parse YAML in {source}: {error}") from error


# ---- dict <-> Config -----------------------------------------------------------------------------


def _all_keys() -> list[str]:
    return [f"{section}.{f.name}" for section, cls in _SECTIONS.items() for f in fields(cls)]


def _unknown_key(key: str, source: str) -> ConfigError:
    """The error for an unknown dotted key, suggesting the closest valid key."""
    section, _, leaf = key.partition(".")
    all_keys = _all_keys()
    leaves = sorted({k.split(".")[1] for k in all_keys})
    if section not in _SECTIONS:
        candidates = list(_SECTIONS)
        match = difflib.get_close_matches(section, candidates, n=1)
        if match and leaf:  # optm.lr -> optim.lr
            match = [f"{match[0]}.{leaf}"] if f"{match[0]}.{leaf}" in all_keys else match
        elif not match and not leaf:  # a field at top level, e.g. `lr:` instead of `optim: {lr:}`
            close = difflib.get_close_matches(section, leaves, n=1)
            match = [k for k in all_keys if close and k.endswith("." + close[0])][:1]
    else:
        own = [f.name for f in fields(_SECTIONS[section])]
        candidates = [f"{section}.{name}" for name in own]
        match = [f"{section}.{name}" for name in difflib.get_close_matches(leaf, own, n=1)]
        if not match:  # a field of another section, e.g. model.lr -> optim.lr
            close = difflib.get_close_matches(leaf, leaves, n=1)
            match = [k for k in all_keys if close and k.endswith("." + close[0])][:1]
    hint = f"did you mean {match[0]!r}?" if match else "valid keys: " + ", ".join(candidates)
    return ConfigError(f"unknown key {key!r} in {source}; {hint}")


def _not_a_mapping(data: Any, source: str) -> ConfigError:
    return ConfigError(
        f"{source} must be a mapping of sections (model, optim, ...), got {_describe(data)}"
    )


def _check_tree(data: Any, source: str) -> dict[str, dict[str, Any]]:
    """Check keys and value types of one raw mapping; return a normalised copy (floats coerced)."""
    if not isinstance(data, Mapping):
        raise _not_a_mapping(data, source)
    tree: dict[str, dict[str, Any]] = {}
    for section, values in data.items():
        section = str(section)
        if section == "base":
            raise ConfigError(
                f"'base' in {source} is only allowed in a YAML file read by load_config"
            )
        if section not in _SECTIONS:
            raise _unknown_key(section, source)
        if values is None:  # an empty `model:` header reads as null; treat it as an empty section
            values = {}
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"section {section!r} in {source} must be a mapping of keys to values, "
                f"got {_describe(values)}"
            )
        types = _field_types(_SECTIONS[section])
        tree[section] = {}
        for name, value in values.items():
            name = _SECTIONS[section].ALIASES.get(str(name), name)
            key = f"{section}.{name}"
            if name not in types:
                raise _unknown_key(key, source)
            try:
                tree[section][name] = _coerce(value, types[name], key)
            except ConfigError as error:
                raise ConfigError(f"{error} (in {source})") from None
    return tree


def config_from_dict(data: Mapping, source: str = "<dict>") -> Config:
    """Build a Config from nested dicts, strictly: unknown keys, wrong types and bad ranges raise."""
    tree = _check_tree(data, source)
    sections = {}
    for name, cls in _SECTIONS.items():
        try:
            sections[name] = cls(**tree.get(name, {}))
        except ConfigError as error:
            raise ConfigError(f"{error} (in {source})") from None
    return Config(**sections)


def config_to_dict(config: Config) -> dict:
    """The config as plain nested dicts of every field; round-trips through config_from_dict."""
    return dataclasses.asdict(config)


def config_to_yaml(config: Config) -> str:
    """The config as YAML text, in field order; load_config reads it back to an equal Config."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


# ---- files and overrides -------------------------------------------------------------------------


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load_tree(path: Path, chain: tuple[tuple[Path, str], ...] = ()) -> dict:
    """Read one file and its `base:` ancestors into one checked, merged tree."""
    source = str(path)
    resolved = path.resolve()
    if any(resolved == seen for seen, _ in chain):
        cycle = " -> ".join([shown for _, shown in chain] + [source])
        raise ConfigError(f"base cycle: {cycle}; remove one of these base: entries")
    included = f" (the base of {chain[-1][1]})" if chain else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {source}{included} not found") from None
    except IsADirectoryError:
        raise ConfigError(
            f"config path {source}{included} is a directory: give a YAML file such as configs/tiny.yaml"
        ) from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {source}{included} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start}): give a YAML file, saved as UTF-8"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {source}{included}: {error.strerror or error}") from None
    data = _parse_yaml(text, source)
    if data is None:
        raise ConfigError(
            f"config file {source}{included} is empty (no settings, only comments or nothing): an empty file is "
            f"more likely a mistake than a wish for every default; write at least `base: tiny.yaml` or one section"
        )
    if not isinstance(data, Mapping):
        raise _not_a_mapping(data, source)
    data = dict(data)
    base = data.pop("base", None)
    tree = _check_tree(data, source)
    if base is None:
        return tree
    if not isinstance(base, str) or not base:
        raise ConfigError(
            f"base in {source} must be a file name such as tiny.yaml, got {_describe(base)}"
        )
    parent = _load_tree(path.parent / base, chain + ((resolved, source),))
    return _deep_merge(parent, tree)


def _parse_override(override: str) -> tuple[str, str, Any]:
    """Split `section.field=value`; the value is read as YAML (so null, true, 3e-4 all work)."""
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(
            f"override {override!r} is not of the form section.field=value, e.g. optim.lr=3e-4"
        )
    key, _, text = override.partition("=")
    key = key.strip()
    source = f"override {override!r}"
    section, _, name = key.partition(".")
    if section not in _SECTIONS:
        raise _unknown_key(key, source)
    if not name:
        example = fields(_SECTIONS[section])[0].name
        raise ConfigError(f"{source} must name a field, e.g. {section}.{example}=...")
    if _SECTIONS[section].ALIASES.get(name, name) not in _field_types(_SECTIONS[section]):
        raise _unknown_key(key, source)
    return section, name, _parse_yaml(text, source)  # _check_tree resolves an alias to its field


def _apply_to_tree(tree: dict, overrides: Sequence[str]) -> dict:
    if isinstance(overrides, str):
        raise ConfigError(
            f"overrides must be a list of strings, got the single string {overrides!r}"
        )
    tree = {section: dict(values) for section, values in tree.items()}
    for override in overrides:
        section, name, value = _parse_override(override)
        checked = _check_tree({section: {name: value}}, f"override {override!r}")
        tree.setdefault(section, {}).update(checked[section])
    return tree


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """A new Config with `section.field=value` overrides applied (all at once, then re-validated)."""
    if not overrides:
        return config_from_dict(config_to_dict(config), source="config")
    tree = _apply_to_tree(config_to_dict(config), overrides)
    return config_from_dict(tree, source="config with overrides " + " ".join(overrides))


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML experiment (following `base:`), apply overrides, and check every section."""
    path = Path(path)
    tree = _apply_to_tree(_load_tree(path), overrides)
    source = str(path) + (" with overrides " + " ".join(overrides) if overrides else "")
    return config_from_dict(tree, source=source)

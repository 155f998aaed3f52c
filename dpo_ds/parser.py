"""Reading a DPOConfig from a YAML file and command-line flags, with transformers' `HfArgumentParser`.

It works like TRL's `TrlParser`: `--config run.yaml` sets the values of the keys it names (and
environment variables under `env:`), flags given on the command line win over the file, `--help`
lists every field with its documentation, and a boolean field whose default is true also gets
`--no_<field>`. On top of that: an unknown key is an error that suggests the closest valid one, a
bad value names key, value and what is allowed, `none` sets an optional field to None, and every
value records where it came from (default, the file, or the command line).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Any, Callable, Optional

import yaml
from transformers import HfArgumentParser

from .config import ConfigError, DPOConfig, field_docs, unknown_key
from .trl_fields import ALIASES, NO_EFFECT, REFUSED, TRL_ONLY_DEFAULTS

DEFAULT, COMMAND_LINE = "default", "command line"


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _json_object(text: str) -> dict:
    """argparse type of a mapping field: a JSON object."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object: {text!r}")
    return value


def _or_none(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse type of an optional field: `none`/`null` is None, anything else goes to `convert`."""
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


class ConfigParser(HfArgumentParser):
    """HfArgumentParser over DPOConfig with `--config`, the TRL model aliases and the launcher's --local_rank."""

    def __init__(self, prog: Optional[str] = None, description: Optional[str] = None, **kwargs: Any):
        super().__init__(DPOConfig, prog=prog, description=description or
                         "Values come from DPOConfig's defaults, then --config's YAML file, then the flags.",
                         allow_abbrev=False, **kwargs)
        self.add_argument("--config", help="YAML file of config keys (the command line overrides it).")
        trl_only = self.add_argument_group("TRL/transformers keys that are not DPOConfig options (docs/trl_fields.md)")
        reasons = {**{k: f"Sets {t}" + (f"[{key!r}]" if key else "") + "." for k, (t, key) in ALIASES.items()},
                   **{k: f"No effect: {why}." for k, (_, why) in NO_EFFECT.items()},
                   **{k: f"Only TRL's default ({d!r}): {why}." for k, (d, why) in REFUSED.items()}}
        hints, docs = typing.get_type_hints(DPOConfig), field_docs()
        fields = {f.name: f for f in dataclasses.fields(DPOConfig)}
        for action in list(self._actions):
            f = fields.get(action.dest)
            if f is None or isinstance(action, argparse._StoreFalseAction):
                continue
            action.default = _default(f)
            if f.name in TRL_ONLY_DEFAULTS:  # listed in their own group, after the options
                self._action_groups[1]._group_actions.remove(action)
                trl_only._group_actions.append(action)
                action.help = argparse.SUPPRESS if f.name == "local_rank" else reasons[f.name].replace("%", "%%")
                if hints[f.name] is Any:
                    action.type = _or_none(_yaml_value)
                continue
            action.help = docs[f.name].replace("%", "%%") + (
                "" if action.default in (None, [], {}) else f" (default: {action.default})")
            args = typing.get_args(hints[f.name])
            if dict in (hints[f.name], *args):
                action.type = _json_object
            elif int in args and str in args:
                action.type = _int_or_str
            if type(None) in args and action.type is not None:
                action.type = _or_none(action.type)

    def error(self, message: str) -> typing.NoReturn:
        """argparse's errors (a bad value, a missing value) become ConfigErrors: the caller decides the exit."""
        raise ConfigError(message)

    def _parse_or_raise(self, argv: list[str], where: str) -> tuple[argparse.Namespace, list[str]]:
        try:
            return self.parse_known_args(argv)
        except ConfigError as err:
            raise ConfigError(f"{err} ({where})") from None

    def parse(self, argv: Optional[list[str]] = None, allow_extra: bool = False
              ) -> tuple[DPOConfig, dict[str, str], list[str]]:
        """(config, {field: where its value came from}, arguments left over).

        Arguments that are not config flags are an error suggesting the closest key, unless
        `allow_extra` (a subcommand parses its own flags from what is left).
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config")
        path = pre.parse_known_args(argv)[0].config
        file_values = _read_yaml(path) if path else {}
        dests = {a.dest for a in self._actions}
        unknown = [k for k in file_values if k not in dests]
        if unknown:
            raise unknown_key(unknown[0], f"in {path}")
        saved = [a.default for a in self._actions]
        try:
            for action in self._actions:
                action.default = argparse.SUPPRESS
            given = vars(self._parse_or_raise(argv, "on the command line")[0])
            for action, default in zip(self._actions, saved):
                action.default = file_values.get(action.dest, default)
            namespace, rest = self._parse_or_raise(argv, f"set in {path}")  # the flags parsed already
        finally:
            for action, default in zip(self._actions, saved):
                action.default = default
        if rest and not allow_extra:
            word = rest[0]
            if word.startswith("-"):
                raise unknown_key(word.lstrip("-").partition("=")[0].replace("-", "_"), "on the command line")
            raise ConfigError(f"unexpected argument {word!r}: values follow a --key flag")
        values = dict(vars(namespace))
        for name in ("config", "help"):
            values.pop(name, None)
        values = {k: None if v == [None] else v for k, v in values.items()}  # `--list_field none`
        sources = {name: COMMAND_LINE if name in given else (path if name in file_values else DEFAULT)
                   for name in values}
        try:
            config = DPOConfig(**values)
        except ConfigError as err:
            where = [f"{k} set on the command line" if sources.get(k) == COMMAND_LINE else f"{k} set in {path}"
                     for k in err.keys if sources.get(k, DEFAULT) != DEFAULT]
            if not where:
                raise
            raise ConfigError(f"{err} ({'; '.join(where)})", *err.keys) from None
        sources["local_rank"] = DEFAULT  # the launcher's, reset by DPOConfig
        for alias, (target, _) in ALIASES.items():
            if sources[alias] != DEFAULT:
                sources[target] = sources[alias]
        return config, sources, rest


def _int_or_str(text: str) -> Any:
    """argparse type of an int-or-word field (pad_to_multiple_of: 64 or auto)."""
    return int(text) if text.strip().lstrip("-").isdigit() else text


def _yaml_value(text: str) -> Any:
    """argparse type of a TRL-only key: the value as YAML reads it (true, 0.1, [a, b], ...), except
    that words YAML 1.1 would turn into booleans or null ("no", "off", "") stay strings."""
    value = yaml.safe_load(text) if text.strip() else text
    return text if isinstance(value, bool) and text.strip().lower() not in ("true", "false") else value


def parse_args(argv: Optional[list[str]] = None, prog: str = "train.py") -> DPOConfig:
    """The config of `argv`; anything that is not a config flag is an error; --help prints and exits."""
    return ConfigParser(prog=prog).parse(argv)[0]


def parse_known(argv: Optional[list[str]] = None) -> tuple[DPOConfig, list[str]]:
    """The config of `argv`'s config flags, and the other arguments (in order, -h/--help too) for a subcommand."""
    config, _, rest = ConfigParser(add_help=False).parse(argv, allow_extra=True)
    return config, rest


def describe(config: DPOConfig, sources: dict[str, str]) -> str:
    """The resolved config as text: every value that differs from DPOConfig's default, and where it came from."""
    defaults = DPOConfig()
    lines = [f"  {f.name}: {getattr(config, f.name)!r}  ({sources.get(f.name, DEFAULT)})"
             for f in dataclasses.fields(DPOConfig) if getattr(config, f.name) != getattr(defaults, f.name)]
    return "resolved config (values that differ from DPOConfig's defaults):\n" + ("\n".join(lines) or "  (none)")


def _read_yaml(path: str) -> dict[str, Any]:
    """The mapping of a --config file; its `env:` mapping is exported to the environment (as TrlParser does)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path!r} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of config keys, got {type(data).__name__}")
    env = data.pop("env", {})
    if not isinstance(env, dict):
        raise ConfigError(f"config file {path!r}: env must be a mapping of environment variables")
    os.environ.update({str(k): str(v) for k, v in env.items()})
    return {str(k).replace("-", "_"): v for k, v in data.items()}

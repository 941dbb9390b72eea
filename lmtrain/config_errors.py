"""Config mistakes as one line a person can act on: the key or option seen, and the valid ones.

Hydra reports an unknown key with a hint to add it with `+key=...`, which a typed schema then
ignores; here every unknown key fails, with or without `+`, naming the keys that exist.
"""

from __future__ import annotations

import dataclasses
import difflib

from omegaconf import DictConfig, OmegaConf


def valid_keys(node_type: type) -> list[str]:
    return [f.name for f in dataclasses.fields(node_type)] if dataclasses.is_dataclass(node_type) else []


def unknown_key_message(full_key: str, node_type: type) -> str:
    parent, _, key = full_key.rpartition(".")
    keys = valid_keys(node_type)
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean '{parent + '.' if parent else ''}{close[0]}'?)" if close else ""
    return f"unknown config key '{full_key}'{hint}; valid keys of {parent or 'the top level'}: {', '.join(keys)}"


def check_known_keys(cfg: DictConfig, prefix: str = "") -> None:
    """Raise ValueError for a key the schema does not have (one added with `+key=value`)."""
    node_type = OmegaConf.get_type(cfg)
    keys = valid_keys(node_type)
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if keys and key not in keys:
            raise ValueError(unknown_key_message(full, node_type))
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            check_known_keys(child, prefix=f"{full}.")


def describe(error: BaseException) -> str | None:
    """One line for a config error raised while Hydra composes the config, or None if `error` is
    not one (a bug, whose traceback should be seen)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        MissingMandatoryValue,
        OmegaConfBaseException,
        ValidationError,
    )

    if isinstance(error, OSError) and error.filename:  # Hydra creating the run dir
        return (f"cannot create the run directory {error.filename}: {error.strerror}"
                + (" (a file of that name is in the way)" if isinstance(error, (FileExistsError, NotADirectoryError)) else "")
                + "; choose another runs_dir= or run_name=, or fix that path")
    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, MissingMandatoryValue) and e.full_key:
            return f"{e.full_key} is required and was not given: add {e.full_key}=... to the command (see --help)"
        if isinstance(e, MissingConfigException) and e.options:
            group, _, option = (e.missing_cfg_file or "").rpartition("/")
            return f"{group}={option} is not an option of config group '{group}'; choose one of: {', '.join(e.options)}"
        if isinstance(e, (ConfigAttributeError, ConfigKeyError)) and e.full_key and dataclasses.is_dataclass(e.object_type):
            return unknown_key_message(e.full_key, e.object_type)
        if isinstance(e, ValidationError) and e.full_key:
            return f"{e.full_key}={e.value!r}: {e.msg.splitlines()[0] if e.msg else e}"
    for e in chain:  # lmtrain's own checks (a resolver of the run dir) say it best
        if isinstance(e, ValueError) and not isinstance(e, OmegaConfBaseException):
            return str(e)
    for e in chain:
        if isinstance(e, OmegaConfBaseException) and e.msg:
            return e.msg.splitlines()[0] + (f" (key '{e.full_key}')" if e.full_key else "")
    if isinstance(error, ConfigCompositionException):
        lines = [line for line in str(error).splitlines() if line.strip() and not line.startswith("To append")]
        return " ".join(line.strip() for line in lines)
    return None

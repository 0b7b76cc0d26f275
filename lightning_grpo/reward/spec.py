"""A reward as its description: the parsed `class_path` + `init_args`, plain values only, built where it is called.

A reward owner (reward/owner.py) builds its reward in another process, so it must ship what to build, not a built
object or a closure: the config library's factory holds the whole command line object (the Trainer, the policy's
weights, a lock) and builds nested rewards in every rank before the owner sees them. `RewardSpec` is the
description the YAML gave, as plain data (a few hundred bytes), built with the same config library and type checks
in the process that calls it. A description that would carry weights, tensors or other live objects is refused
naming the key, as is one larger than `MAX_DESCRIPTION_BYTES` (numbers enough to be weights).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import yaml

from .base import Reward

MAX_DESCRIPTION_BYTES = 256 * 1024
_PLAIN = (str, int, float, bool, type(None))


class RewardSpec:
    """`{class_path, init_args}` of plain values (YAML-safe); calling it builds the reward in this process."""

    def __init__(self, config: dict[str, Any]) -> None:
        if not isinstance(config, dict) or not isinstance(config.get("class_path"), str):
            raise TypeError(f"a reward description needs a 'class_path: package.module.Class', got {config!r}")
        _check_plain(config, "reward")
        size = len(yaml.safe_dump(config))
        if size > MAX_DESCRIPTION_BYTES:
            raise ValueError(
                f"the reward description of {config['class_path']} is {size} bytes (limit {MAX_DESCRIPTION_BYTES}): "
                "it carries data, not a description; pass large inputs as file paths in init_args"
            )
        self.config = config

    def __call__(self) -> Reward:
        from jsonargparse import ArgumentParser

        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--reward", type=Callable[[], Reward])
        factory = parser.instantiate_classes(parser.parse_object({"reward": self.config})).reward
        return factory()

    def __repr__(self) -> str:
        return f"RewardSpec({self.config['class_path']})"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.config, sort_keys=False)


def describe(reward: Any) -> RewardSpec:
    """The description of `reward`: a RewardSpec, a `{class_path, init_args}` dict, a class, or a
    `functools.partial` of a class with plain arguments. Anything else (a lambda, a built reward, the config
    library's factory holding built objects) is refused: it cannot be rebuilt in another process from plain data."""
    if isinstance(reward, RewardSpec):
        return reward
    if isinstance(reward, dict):
        return RewardSpec(reward)
    if inspect.isclass(reward):
        return RewardSpec({"class_path": _import_path(reward), "init_args": {}})
    if isinstance(reward, functools.partial):
        func, args = reward.func, reward.args
        if isinstance(func, functools.partial) and args and inspect.isclass(args[0]):  # the config library's factory
            func, args = args[0], args[1:]
        if inspect.isclass(func):
            signature = inspect.signature(func)
            init_args: dict[str, Any] = {}
            for name, value in signature.bind_partial(*args, **reward.keywords).arguments.items():
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_POSITIONAL:
                    break  # `*args` have no names to describe them by
                init_args.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
            else:
                return RewardSpec({"class_path": _import_path(func), "init_args": init_args})
    raise TypeError(
        f"SharedReward(reward=...) got {reward!r}: give it the reward as `class_path` + `init_args` in YAML, a "
        "RewardSpec, a class, or functools.partial(Class, plain arguments), so the owner process can build it"
    )


@contextmanager
def owner_rewards_described(parser: Any, config: Any, owner: type) -> Iterator[None]:
    """While the config library instantiates a parsed config, the `reward:` of every `owner` class in it
    (SharedReward) is its RewardSpec (else the library would build the nested rewards here, in every rank, into a
    factory holding the whole command line); the parsed values are back afterwards, for the saved and logged config."""
    plain = yaml.safe_load(parser.dump(config, skip_link_targets=False, skip_none=False))
    parsed = []  # (the parsed node holding `reward`, its parsed value)
    for path, node in _class_nodes(plain, ()):
        reward = (node.get("init_args") or {}).get("reward")
        if isinstance(reward, dict) and _imports_subclass(node["class_path"], owner):
            holder = config
            for part in (*path, "init_args"):
                holder = holder[part]
            parsed.append((holder, holder["reward"]))
            holder["reward"] = RewardSpec(reward)
    try:
        with warnings.catch_warnings():  # Lightning dumps the config for the model's hparams meanwhile
            warnings.filterwarnings("ignore", "(?s).*Unable to serialize instance RewardSpec")
            yield
    finally:
        for holder, value in parsed:
            holder["reward"] = value


def _class_nodes(node: Any, path: tuple):
    """(keys from the root, node) of every `{class_path: ...}` mapping in a plain config."""
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            yield path, node
        for k, v in node.items():
            yield from _class_nodes(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _class_nodes(v, (*path, i))


def _imports_subclass(class_path: str, base: type) -> bool:
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return inspect.isclass(target) and issubclass(target, base)


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(
            f"the reward description carries a {type(value).__module__}.{type(value).__qualname__} at {where}: "
            "a reward owner builds its reward from plain values (class_path + init_args, checkpoints as paths), "
            "never from weights, tensors or built objects; describe it in YAML as class_path + init_args"
        )


def _import_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"

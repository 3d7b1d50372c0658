"""The code's shape, read from the source with :mod:`ast`: small signatures, a
learning core that knows nothing of Kafka or the command line, and modules that
use one another only through their public names."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("metarec", "streamer")

#: parameters a function may take, all counted (self, *args and **kwargs too):
#: beyond this a call is hard to read and the parameters want grouping in a config
MAX_PARAMETERS = 10

#: what the learning core must not import: the I/O and the CLI are built on it, not
#: in it, so it can be embedded and tested without a broker or a process around it
FORBIDDEN_IN_CORE = frozenset({"kafka", "streamer", "argparse", "prometheus_client"})

#: names with a leading underscore that are public API all the same (namedtuple's)
PUBLIC_UNDERSCORED = frozenset({"_replace", "_asdict", "_fields", "_field_defaults", "_make"})


def sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


@cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"


def is_private(name: str) -> bool:
    """``_name``, not a dunder (``__name__``), an enum sunder (``_name_``) or public API
    that merely starts with an underscore."""
    return (name.startswith("_") and not name.endswith("_")
            and name not in PUBLIC_UNDERSCORED)


def functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method, nested ones too, with its qualified name."""

    def walk(node: ast.AST, prefix: str) -> Iterator[
            tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def parameter_count(args: ast.arguments) -> int:
    return (len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
            + (args.vararg is not None) + (args.kwarg is not None))


def imported_modules(tree: ast.Module) -> Iterator[tuple[ast.AST, str]]:
    """Each absolute import anywhere in a module (inside functions too): the node and
    the module's name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node, node.module


def private_reads(tree: ast.Module) -> Iterator[tuple[ast.AST, str]]:
    """Another module's private names read: ``from x import _y``, and ``obj._y`` where
    ``obj`` is not ``self``, ``cls`` or ``super()``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if is_private(alias.name):
                    yield node, f"from {'.' * node.level}{node.module or ''} import {alias.name}"
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if (isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name)
                    and owner.func.id == "super"):
                continue
            yield node, f"{ast.unparse(owner)}.{node.attr}"


def test_the_checks_see_the_packages() -> None:
    """Guards the tests below: a wrong root would make them pass on no files at all."""
    for package in PACKAGES:
        assert len(sources(package)) >= 5, package


def test_no_function_takes_more_than_ten_parameters() -> None:
    """A long signature is a group of settings without a name: pass a config or a
    record instead, so call sites stay readable and a new option changes one type."""
    too_many = [f"{where(path, fn)} {name} takes {parameter_count(fn.args)}"
                for path in sources(*PACKAGES)
                for name, fn in functions(parse(path))
                if parameter_count(fn.args) > MAX_PARAMETERS]
    assert too_many == [], "\n".join(too_many)


@pytest.mark.parametrize("path", sources("metarec"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_learning_core_never_imports_kafka_or_the_cli(path: Path) -> None:
    """``metarec`` is the library ``streamer`` drives: it must run (and be tested)
    with no broker, no metrics server and no command line."""
    found = [f"{where(path, node)} imports {module}"
             for node, module in imported_modules(parse(path))
             if module.partition(".")[0] in FORBIDDEN_IN_CORE]
    assert found == [], "\n".join(found)


#: private names of third-party code read on purpose, each to work round a bug
#: that its docstring names (and tested)
THIRD_PARTY_WORKAROUNDS = {
    # kafka-python 3.0.12 strands resumed partitions: streamer.kafka_io.poll
    ("streamer/kafka_io.py", "fetcher._next_partition_records"),
}
#: public names of the standard library that begin with an underscore
STDLIB_PUBLIC = {"os._exit"}


def test_modules_read_only_each_others_public_names() -> None:
    """A leading underscore says "may change without notice": a module that reaches
    into another's private names breaks when that one is refactored, so what is
    shared is given a public name (or a method) instead."""
    found = [f"{where(path, node)} reads {what}"
             for path in sources(*PACKAGES)
             for node, what in private_reads(parse(path))
             if (str(path.relative_to(ROOT)), what) not in THIRD_PARTY_WORKAROUNDS
             and what not in STDLIB_PUBLIC]
    assert found == [], "\n".join(found)


def test_the_private_name_check_tells_own_from_foreign() -> None:
    """The rule itself: self's, cls's and super()'s privates are one's own; dunders,
    enum sunders and namedtuple's ``_replace`` are public."""
    tree = ast.parse(
        "from m import _hidden, shown\n"
        "self._mine; cls._ours; super()._base(); other.__name__; Color._value_\n"
        "point._replace(x=1); other._theirs; self.part._deeper\n")
    assert sorted(what for _, what in private_reads(tree)) == [
        "from m import _hidden", "other._theirs", "self.part._deeper"]


def test_parameters_are_counted_of_every_kind() -> None:
    """Positional-only, positional, keyword-only, ``*args`` and ``**kwargs`` all make
    a signature longer."""
    fn = ast.parse("def f(a, /, b, *args, c, **kwargs): pass").body[0]
    assert isinstance(fn, ast.FunctionDef)
    assert parameter_count(fn.args) == 5

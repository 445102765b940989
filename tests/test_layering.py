"""The package layout is the architecture: imports flow one way (DESIGN.md, "Layout").

    cli -> site / server / swarm -> vm / store -> formats (chunk, pack, manifest, vmspec, keys)

Every module under isrsync/ and sneakernet/ is parsed with :mod:`ast` (function-
local imports included, nothing is imported) and these must hold:

* no module imports a private (underscore-prefixed) name from another module;
* sneakernet reaches isrsync only through the error tree, the formats and the
  Source protocol (isrsync.errors, isrsync.{chunk,pack,manifest,keys},
  isrsync.site.sources, and the media plugin protocol isrsync.site.media);
  isrsync never imports sneakernet (it loads it through an entry point);
* isrsync/store (the Store protocol and its clients) imports nothing of
  server/, site/, cli/, swarm/ or demo/;
* the formats import only each other and isrsync.errors;
* isrsync/vm imports nothing of site/, server/, cli/, swarm/ or demo/;
* the demo (isrsync/demo) is imported by nothing but the CLI.

A violation that is known and not yet fixed is listed in :data:`ALLOWED`
(with why); the list is meant to shrink to empty, and an entry that no longer
matches anything fails the test so it gets removed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("isrsync", "sneakernet")

FORMATS = {"isrsync.chunk", "isrsync.pack", "isrsync.manifest", "isrsync.keyring", "isrsync.vmspec", "isrsync.keys",
           "isrsync.locktoken"}
ERRORS = "isrsync.errors"
SOURCE_PROTOCOL = "isrsync.site.sources"
MEDIA_PROTOCOL = "isrsync.site.media"  # what a media plugin implements (entry point isrsync.media)
SNEAKERNET_MAY_USE = FORMATS | {ERRORS, SOURCE_PROTOCOL, MEDIA_PROTOCOL}

# Known violations, as (importing module, what it imports). Each is in a file
# the layering change could not touch; fix the import, then delete the entry.
ALLOWED: frozenset[tuple[str, str]] = frozenset({
    # The man page / completion generator documents the sneakernet command too,
    # so it imports sneakernet.cli; it is a build tool living inside the package.
    ("isrsync.docgen", "sneakernet.cli.app"),
})


@dataclass(frozen=True)
class Imp:
    importer: str  # dotted name of the importing module
    path: Path
    line: int
    target: str  # dotted name of what is imported: a module, or module.name

    @property
    def key(self) -> tuple[str, str]:
        return (self.importer, self.target)

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path, source: str | None = None, name: str | None = None) -> list[Imp]:
    """The imports of the module at ``path`` (or of ``source`` read as if it were module ``name`` there)."""
    name = name or _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Imp] = []
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Imp(name, path, node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "__future__":
                continue
            found += [Imp(name, path, node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def _all_imports() -> list[Imp]:
    return [imp for path in _files() for imp in _imports(path)]


def _module_of(target: str) -> str:
    """The module a target names: itself if it is one, else the module the name is taken from."""
    return target if _is_module(target) else target.rpartition(".")[0]


def _within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _violations(imp: Imp) -> list[str]:
    out: list[str] = []
    me, target = imp.importer, imp.target
    mod = _module_of(target)
    project = _within(target, *PACKAGES)

    if project and any(_private(p) for p in target.split(".")):
        out.append(f"private: imports {target}, a private name of another module")

    if _within(me, "sneakernet") and _within(target, "isrsync") and not _within(mod, *SNEAKERNET_MAY_USE):
        out.append(f"sneakernet -> isrsync: imports {target}; sneakernet may use only {ERRORS}, "
                   f"the formats, {SOURCE_PROTOCOL} and {MEDIA_PROTOCOL}")
    if _within(me, "isrsync") and _within(target, "sneakernet"):
        out.append(f"isrsync -> sneakernet: imports {target}; isrsync reaches sneakernet only through "
                   f"the Source protocol")

    above_store = ("isrsync.server", "isrsync.site", "isrsync.cli", "isrsync.swarm", "isrsync.demo")
    if _within(me, "isrsync.store") and _within(target, *above_store):
        out.append(f"store/ -> above: imports {target}, a layer above store/")

    if me in FORMATS and _within(target, "isrsync") and not _within(mod, *FORMATS, ERRORS):
        out.append(f"format -> above: imports {target}; the formats use only each other and {ERRORS}")

    above_vm = ("isrsync.site", "isrsync.server", "isrsync.cli", "isrsync.swarm", "isrsync.demo")
    if _within(me, "isrsync.vm") and _within(target, *above_vm):
        out.append(f"vm/ -> above: imports {target}, a layer above vm/")

    if _within(target, "isrsync.demo") and not _within(me, "isrsync.demo", "isrsync.cli"):
        out.append(f"-> demo: imports {target}; only the CLI runs the demo")
    return out


def _found() -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for imp in _all_imports():
        for why in _violations(imp):
            found.setdefault(imp.key, []).append(f"{imp.where()} ({imp.importer}): {why}")
    return found


def test_the_walk_sees_the_packages() -> None:
    """Guard against a vacuous pass: the modules and their imports are really found."""
    names = {_module_name(p) for p in _files()}
    assert {"isrsync.cli.main", "isrsync.server.repo", "isrsync.store.base", "isrsync.demo.run",
            "sneakernet.cli"} <= names
    targets = {i.target for i in _all_imports() if i.importer == "isrsync.server.local"}
    assert "isrsync.server.repo.Repository" in targets  # a relative import, resolved
    assert "isrsync.store.base.CommitRequest" in targets


def test_imports_flow_one_way() -> None:
    problems = [line for key, lines in sorted(_found().items()) if key not in ALLOWED for line in lines]
    assert not problems, "layering violations:\n" + "\n".join(problems)


def test_the_allow_list_has_no_stale_entries() -> None:
    stale = sorted(ALLOWED - set(_found()))
    assert not stale, f"fixed, so remove from ALLOWED in {Path(__file__).name}: {stale}"


def _snippet(importer: str, source: str) -> list[Imp]:
    """The imports of ``source`` as if it were the module ``importer``."""
    return _imports(ROOT.joinpath(*importer.split(".")).with_suffix(".py"), source, importer)


@pytest.mark.parametrize(("importer", "source", "why"), [
    ("isrsync.cli.demo", "from ..demo.run import _short_runtime", "private"),
    ("isrsync.site.state", "from .cache import _readonly_fs", "private"),
    ("sneakernet.cli", "from isrsync.cli.main import run_app", "sneakernet -> isrsync"),
    ("sneakernet.cli", "from isrsync import __version__", "sneakernet -> isrsync"),
    ("sneakernet.cli", "import isrsync.store.http", "sneakernet -> isrsync"),
    ("isrsync.store.local", "from ..server.repo import Repository", "store/ -> above"),
    ("isrsync.store.http", "from ..site import account", "store/ -> above"),
    ("isrsync.pack", "from .site.cache import SiteCache", "format -> above"),
    ("isrsync.keys", "from .fsutil import atomic_write", "format -> above"),
    ("isrsync.vm.qemu", "from ..site import account", "vm/ -> above"),
    ("isrsync.vm.nbd", "def f():\n    from ..server.app import make_app", "vm/ -> above"),
    ("isrsync.site.parcel", "from ..demo.guest import build_guest", "-> demo"),
    ("isrsync.site.parcel", "import sneakernet.cli", "isrsync -> sneakernet"),
])
def test_the_rules_catch_what_they_should(importer: str, source: str, why: str) -> None:
    imps = _snippet(importer, source)
    assert imps and any(why in v for i in imps for v in _violations(i)), imps


@pytest.mark.parametrize(("importer", "source"), [
    ("sneakernet.cli", "from isrsync.errors import IsrError"),
    ("sneakernet.cli", "from isrsync.site.sources import Source"),
    ("sneakernet.cli", "from isrsync import pack"),
    ("sneakernet.cli", "from isrsync.manifest import parse_header"),
    ("isrsync.site.account", "from ..server.local import LocalStore"),
    ("isrsync.cli.demo", "from ..demo.run import short_runtime"),
    ("isrsync.cli.main", "from .. import __version__"),
    ("isrsync.pack", "from .chunk import tag_of"),
    ("isrsync.vm.qemu", "from ..store.base import Holder"),
])
def test_the_rules_allow_what_they_should(importer: str, source: str) -> None:
    imps = _snippet(importer, source)
    assert imps and not [v for i in imps for v in _violations(i)], imps

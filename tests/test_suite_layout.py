"""The suite's own layout: pytest's default (prepend) import mode imports every
test module under its bare basename, so two test files with the same name in
directories without an __init__.py stop collection outright (CI saw exactly that)."""

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).parent


def test_test_module_basenames_are_unique_outside_packages():
    seen: dict[str, list[Path]] = defaultdict(list)
    for path in TESTS.rglob("*.py"):
        if (path.parent / "__init__.py").exists() or path.name == "conftest.py":
            continue
        seen[path.name].append(path.relative_to(TESTS))
    clashes = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not clashes, f"rename one of each: {clashes}"


def test_no_test_module_imports_a_conftest():
    """Every directory's conftest.py is imported as the one module ``conftest``: a
    ``from conftest import`` gets whichever was loaded last, so running files of two
    directories together failed to import. Helpers shared by tests go in a *kit.py."""
    importers = sorted(
        str(path.relative_to(TESTS)) for path in TESTS.rglob("*.py")
        if path.name != "conftest.py"
        and any(line.strip().startswith(("from conftest import", "import conftest"))
                for line in path.read_text().splitlines())
    )
    assert not importers, f"import these helpers from a *kit.py instead: {importers}"

"""The generated man pages and shell completions (isrsync.docgen).

The files in man/ and completions/ are generated from the live CLI tree; these
tests fail when they are stale, check that they are well-formed roff and valid
shell, and that the completions actually complete (bash always; zsh and fish
syntax too where those shells are installed).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import enum
import importlib
import os
import pkgutil
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import typer

import isrsync
from isrsync import __version__, docgen, errors
from isrsync.cli import main

REPO = Path(__file__).resolve().parents[2]
COMPLETIONS = (docgen.BASH_FILE, docgen.ZSH_FILE, docgen.FISH_FILE)


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    return docgen.generate(REPO)


@pytest.fixture(scope="module")
def tree() -> docgen.Command:
    return docgen.command_tree()


# --------------------------------------------------------------------------
# A deeper, nastier CLI than the real one, to exercise the generator
# --------------------------------------------------------------------------


class Color(str, enum.Enum):
    red = "red"
    blue = "blue"


def deep_app() -> typer.Typer:
    app = typer.Typer(
        name="isrsync",
        help="Top. Has a 'quote', a back\\slash and a dash-y word \u2014 and more.",
        rich_markup_mode=None,
        add_completion=False,
        no_args_is_help=True,
    )

    @app.callback()
    def root(
        verbose: Annotated[
            int, typer.Option("-v", "--verbose", count=True, help="More output.")
        ] = 0,
        color: Annotated[
            Color,
            typer.Option(
                "--color",
                "-c",
                envvar="ISR_COLOR",
                help="Colour [red] or [blue]: pick one.",
            ),
        ] = Color.red,
    ) -> None:
        pass

    one = typer.Typer(help="Level one.", no_args_is_help=True)
    two = typer.Typer(help="Level two.", no_args_is_help=True)

    @two.command("leaf")
    def leaf(
        name: Annotated[str, typer.Argument(help="The name.")],
        paths: Annotated[list[Path] | None, typer.Argument(help="Some paths.")] = None,
        force: Annotated[
            bool, typer.Option("--force/--no-force", "-f", help="Force it.")
        ] = False,
        tag: Annotated[
            list[str] | None,
            typer.Option("--tag", help="A tag; give it again for more."),
        ] = None,
        level: Annotated[int, typer.Option(help="How hard.")] = 3,
        secret: Annotated[str, typer.Option(hidden=True)] = "",
    ) -> None:
        """Do the leaf thing.

        .starts with a dot
        'starts with a quote and has a \\backslash

        \b
        verbatim  line one
        .verbatim line two
        """

    @two.command("hidden-cmd", hidden=True)
    def hidden_cmd() -> None:
        """Never shown."""

    one.add_typer(two, name="two")
    app.add_typer(one, name="one")

    @app.command("plain")
    def plain() -> None:
        """Plain command."""

    return app


@pytest.fixture(scope="module")
def deep_files() -> dict[str, str]:
    return docgen.generate(Path("unused"), app=deep_app())


@pytest.fixture(scope="module")
def deep_dir(
    tmp_path_factory: pytest.TempPathFactory, deep_files: dict[str, str]
) -> Path:
    d = tmp_path_factory.mktemp("deep")
    docgen.write(d, deep_files)
    return d


# --------------------------------------------------------------------------
# Freshness: the committed files are what the CLI generates
# --------------------------------------------------------------------------


def test_generated_files_are_up_to_date(files: dict[str, str]) -> None:
    bad = docgen.stale(REPO, files)
    if bad:
        rel = bad[0]
        current = (
            (REPO / rel).read_text(encoding="utf-8") if (REPO / rel).is_file() else ""
        )
        diff = "".join(
            list(
                difflib.unified_diff(
                    current.splitlines(True),
                    files.get(rel, "").splitlines(True),
                    f"{rel} (on disk)",
                    f"{rel} (generated)",
                )
            )[:40]
        )
        pytest.fail(
            f"man/ and completions/ are stale ({', '.join(bad)}): run scripts/gen-docs to regenerate them.\n{diff}"
        )


def test_output_is_deterministic_and_machine_independent(files: dict[str, str]) -> None:
    assert docgen.generate(REPO) == files
    assert docgen.generate(Path("/elsewhere")) == files
    expected = set()
    for prog, app in docgen.default_apps():
        expected |= {
            f"man/{cmd.page}.1" for cmd in docgen.command_tree(app, prog).walk()
        }
        expected |= {
            docgen.bash_file(prog),
            docgen.zsh_file(prog),
            docgen.fish_file(prog),
        }
    assert set(files) == expected
    assert {
        "man/isrsync.1",
        "man/sneakernet.1",
        "completions/sneakernet.bash",
    } <= expected
    assert set(COMPLETIONS) <= expected
    for rel, content in files.items():
        assert content.endswith("\n") and not content.endswith("\n\n"), rel
        assert not re.search(r"\b(19|20)\d\d-\d\d-\d\d\b", content), (
            f"{rel} contains a date"
        )
        assert str(REPO) not in content and str(Path.home()) not in content, (
            f"{rel} contains a local path"
        )
    assert f"isrsync {__version__}" in files["man/isrsync.1"]


def test_nothing_in_the_package_imports_the_generator() -> None:
    """docgen documents the CLI (it imports the apps), never the other way round."""
    package = Path(isrsync.__file__).parent
    importers = [
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if p.name != "docgen.py"
        and re.search(
            r"^\s*(from\s+\S*docgen\b|import\s+\S*docgen\b|from\s+\S+\s+import\s+.*\bdocgen\b)",
            p.read_text(encoding="utf-8"),
            re.MULTILINE,
        )
    ]
    assert importers == []
    assert not (package / "cli" / "docs.py").exists()


def test_adding_a_subcommand_changes_the_output(files: dict[str, str]) -> None:
    clone = copy.deepcopy(main.app)
    cache_group = next(
        g.typer_instance for g in clone.registered_groups if g.name == "cache"
    )

    @cache_group.command("zzfrob")
    def zzfrob(
        hard: Annotated[
            bool, typer.Option("--zzhard", help="Frobnicate harder.")
        ] = False,
    ) -> None:
        """Frobnicate the cache."""

    changed = docgen.generate(REPO, app=clone)
    assert "man/isrsync-cache-zzfrob.1" in changed
    assert changed["man/isrsync-cache.1"] != files["man/isrsync-cache.1"]
    for rel in COMPLETIONS:
        assert changed[rel] != files[rel]
        assert "zzfrob" in changed[rel] and "zzhard" in changed[rel], rel
    # so the freshness check above would fail on such a change ...
    assert "man/isrsync-cache-zzfrob.1" in docgen.stale(REPO, changed)
    assert set(COMPLETIONS) <= set(docgen.stale(REPO, changed))
    # ... and the copy left the real CLI alone
    assert docgen.generate(REPO) == files


def test_main_writes_checks_and_removes_stale_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 0
    capsys.readouterr()

    (tmp_path / "man" / "isrsync-cache.1").write_text("edited by hand\n")
    gone = tmp_path / "man" / "isrsync-gone.1"
    gone.write_text(f'.\\" {docgen.MARKER}\n.TH GONE 1\n')
    mine = tmp_path / "man" / "other.1"
    mine.write_text(".TH OTHER 1\n")
    (tmp_path / "completions" / "isrsync.fish").unlink()

    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "scripts/gen-docs" in err
    for rel in (
        "man/isrsync-cache.1",
        "man/isrsync-gone.1",
        "completions/isrsync.fish",
    ):
        assert rel in err
    assert "other.1" not in err

    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert not gone.exists() and mine.exists()
    assert docgen.stale(tmp_path) == []


def test_gen_docs_script(tmp_path: Path) -> None:
    script = REPO / "scripts" / "gen-docs"
    assert script.stat().st_mode & stat.S_IXUSR, "scripts/gen-docs must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(
        [str(script), "--check"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, (
        f"run scripts/gen-docs to regenerate man/ and completions/\n{r.stderr}"
    )


# --------------------------------------------------------------------------
# Man pages
# --------------------------------------------------------------------------

KNOWN_MACROS = {
    ".nh",
    ".ad",
    ".TH",
    ".SH",
    ".SS",
    ".PP",
    ".TP",
    ".IP",
    ".B",
    ".BR",
    ".I",
    ".IR",
    ".br",
    ".nf",
    ".fi",
}
KNOWN_ESCAPES = re.compile(r"\\(?:e|-|&|f[BIR]|\((?:aq|ga|dq)|\[u[0-9A-F]{4,6}\])")


def roff_problems(name: str, text: str) -> list[str]:
    """Structural problems of a generated man(7) page, checked in Python."""
    problems = []
    lines = text.split("\n")
    body = [ln for ln in lines if not ln.startswith('.\\"')]
    if not body or not body[0].startswith(".TH "):
        problems.append("does not start with .TH")
    else:
        th = re.findall(r'"([^"]*)"', body[0])
        if (
            len(th) != 5
            or th[1] != "1"
            or th[2] != ""
            or th[3] != f"{name.split('-')[0]} {docgen.roff_escape(__version__)}"
        ):
            problems.append(f"bad .TH line: {body[0]!r}")
    sections = [ln[4:] for ln in body if ln.startswith(".SH ")]
    for required in ("NAME", "SYNOPSIS"):
        if required not in sections:
            problems.append(f"no .SH {required}")
    if sections[:2] != ["NAME", "SYNOPSIS"]:
        problems.append(f"sections out of order: {sections}")
    if len(sections) != len(set(sections)):
        problems.append(f"repeated section: {sections}")
    for n, ln in enumerate(body):
        where = f"line {n}: {ln!r}"
        if ln[:1] in (".", "'") and ln.split(" ", 1)[0] not in KNOWN_MACROS:
            problems.append(f"unknown request or unguarded control character, {where}")
        if ln[:1] in (" ", "\t"):
            problems.append(f"leading whitespace, {where}")
        rest = KNOWN_ESCAPES.sub("", ln)
        if "\\" in rest:
            problems.append(f"unknown escape, {where}")
        if "-" in rest:
            problems.append(f"unescaped hyphen, {where}")
        if any(ord(c) > 126 for c in ln):
            problems.append(f"non-ASCII character, {where}")
        if ln.startswith(".SH NAME"):
            nxt = body[n + 1] if n + 1 < len(body) else ""
            if "\\-" not in nxt or not nxt.startswith(docgen.roff_escape(name)):
                problems.append(f"NAME line should be '{name} \\- summary': {nxt!r}")
    return problems


def check_man_pages(pages: dict[str, str], where: Path) -> None:
    assert pages
    for rel, text in pages.items():
        assert roff_problems(Path(rel).stem, text) == [], rel
    groff = shutil.which("groff")
    if groff:  # a real formatter, where there is one, must agree
        for rel in pages:
            r = subprocess.run(
                [groff, "-man", "-Tutf8", "-ww", "-z", str(where / rel)],
                check=False,
                capture_output=True,
                text=True,
            )
            assert r.returncode == 0 and r.stderr == "", f"{rel}: {r.stderr}"
        r = subprocess.run(
            [groff, "-man", "-Tascii", str(where / next(iter(pages)))],
            check=False,
            capture_output=True,
            text=True,
        )
        rendered = re.sub(".\b", "", r.stdout)  # no overstrike bold
        assert "NAME" in rendered and "SYNOPSIS" in rendered


def test_man_pages_are_valid_roff(files: dict[str, str]) -> None:
    pages = {rel: text for rel, text in files.items() if rel.startswith("man/")}
    check_man_pages(pages, REPO)


def test_deep_tree_man_pages(deep_files: dict[str, str], deep_dir: Path) -> None:
    pages = {rel: text for rel, text in deep_files.items() if rel.startswith("man/")}
    assert set(pages) == {
        "man/isrsync.1",
        "man/isrsync-one.1",
        "man/isrsync-one-two.1",
        "man/isrsync-one-two-leaf.1",
        "man/isrsync-plain.1",
    }
    check_man_pages(pages, deep_dir)
    leaf = pages["man/isrsync-one-two-leaf.1"]
    assert (
        "\\&.starts with a dot \\(aqstarts with a quote and has a \\ebackslash" in leaf
    )
    assert ".nf\n\\&verbatim  line one\n\\&.verbatim line two\n.fi" in leaf
    assert "\\fB\\-f\\fR, \\fB\\-\\-force\\fR / \\fB\\-\\-no\\-force\\fR" in leaf
    assert "\\fB\\-\\-level\\fR \\fILEVEL\\fR" in leaf and "Default: \\fB3\\fR." in leaf
    assert "May be given more than once." in leaf
    assert "[\\fIOPTIONS\\fR] \\fINAME\\fR [\\fIPATHS\\fR...]" in leaf
    for text in deep_files.values():
        assert (
            "secret" not in text and "hidden" not in text and "Never shown" not in text
        )
    top = pages["man/isrsync.1"]
    assert "\\[u2014]" in top and "back\\eslash" in top and "\\(aqquote\\(aq" in top
    assert ".SH ENVIRONMENT\n.TP\n\\fBISR_COLOR\\fR" in top
    assert "One of:" not in top  # the metavar lists them
    assert "\\fB\\-c\\fR, \\fB\\-\\-color\\fR \\fI[red|blue]\\fR" in top
    assert "\\fBone\\fR" in top and ".BR isrsync\\-one (1)." in top
    assert ".BR isrsync\\-one\\-two\\-leaf (1)" in top  # SEE ALSO reaches every depth
    assert ".BR isrsync\\-one\\-two (1)" in pages["man/isrsync-one.1"]


def test_every_command_has_a_page_with_its_options(
    files: dict[str, str], tree: docgen.Command
) -> None:
    for cmd in tree.walk():
        page = files[f"man/{cmd.page}.1"]
        assert page.startswith('.\\" ') and "\n.TH " in page
        assert f'.TH "{docgen.roff_escape(cmd.page.upper())}" "1" ""' in page
        assert f".B {docgen.roff_escape(cmd.full_name)}\n" in page
        for opt in cmd.options:
            for name in opt.names:
                assert docgen.roff_escape(name) in page, (cmd.full_name, name)
        for sub in cmd.subcommands:
            assert f".BR {docgen.roff_escape(sub.page)} (1)" in page
        if cmd.options and any(o.envvars for o in cmd.options):
            assert ".SH ENVIRONMENT" in page
    assert "\\fBISRSYNC_CACHE\\fR" in files["man/isrsync.1"]


def _import_all_isrsync_modules() -> None:
    """Best effort, so subclasses of IsrError defined anywhere are loaded."""
    for info in pkgutil.walk_packages(isrsync.__path__, "isrsync."):
        # another module's import problem is its own tests' business
        with contextlib.suppress(Exception):
            importlib.import_module(info.name)


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_all_subclasses(sub)]
    return out


def _exit_status_section(page: str) -> dict[int, str]:
    section = page.split("\n.SH EXIT STATUS\n", 1)[1].split("\n.SH ", 1)[0]
    entries = {}
    for chunk in section.split(".TP\n")[1:]:
        head, _, body = chunk.partition("\n")
        m = re.fullmatch(r"\\fB(\d+)\\fR", head)
        assert m, head
        entries[int(m.group(1))] = body
    return entries


def test_top_page_lists_every_exit_code() -> None:
    _import_all_isrsync_modules()
    page = (REPO / "man" / "isrsync.1").read_text(encoding="utf-8")
    listed = _exit_status_section(page)
    classes = [errors.IsrError, *_all_subclasses(errors.IsrError)]
    classes = [c for c in classes if c.__module__.startswith("isrsync.")]
    assert {c.exit_code for c in classes} | set(docgen.FIXED_EXIT_CODES) == set(listed)
    assert list(listed) == sorted(listed)
    for code in (0, 2, 70, 130):
        assert code in listed
    for cls in classes:
        if cls.__module__ != errors.__name__:
            continue  # documented under its (errors.py) ancestor's exit code
        first_line = cls.__doc__.strip().splitlines()[0].strip()
        assert (
            f"\\fB{cls.__name__}\\fR: {docgen.roff_escape(first_line)}"
            in listed[cls.exit_code]
        ), cls


# --------------------------------------------------------------------------
# Completions
# --------------------------------------------------------------------------


def bash_complete(script: Path, line: str) -> list[str]:
    """Complete ``line`` (the cursor at its end) with the completion ``script``."""
    words = line.split(" ")
    prog = "\n".join(
        [
            f"source {shlex.quote(str(script))}",
            f"spec=$(complete -p {shlex.quote(words[0])})",
            "fn=${spec##*-F }; fn=${fn%% *}",
            f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})",
            f"COMP_CWORD={len(words) - 1}",
            f"COMP_LINE={shlex.quote(line)}",
            f"COMP_POINT={len(line)}",
            "COMPREPLY=()",
            '"$fn"',
            "printf '%s\\n' \"${COMPREPLY[@]}\"",
        ]
    )
    r = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", prog],
        check=False,
        capture_output=True,
        text=True,
        cwd=script.parent,
    )
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.split("\n") if w]


def test_bash_completion_is_valid_and_completes(tree: docgen.Command) -> None:
    script = REPO / docgen.BASH_FILE
    subprocess.run(["bash", "-n", str(script)], check=True)
    reply = bash_complete(script, "isrsync ca")
    assert "cache" in reply and all(w.startswith("ca") for w in reply)
    reply = bash_complete(script, "isrsync cache ")
    assert {"info", "verify"} <= set(reply)
    cache = next(c for c in tree.subcommands if c.name == "cache")
    assert reply == [s.name for s in cache.subcommands]
    assert bash_complete(script, "isrsync ") == [s.name for s in tree.subcommands]
    assert bash_complete(script, "isrsync --debug cache v") == ["verify"]
    assert bash_complete(script, "isrsync --cache-dir /tmp c") == [s.name for s in tree.subcommands
                                                                  if s.name.startswith("c")]
    assert set(bash_complete(script, "isrsync --")) == {
        n for o in tree.options for n in o.names
    }
    assert set(bash_complete(script, "isrsync cache info --")) == {"--json", "--help"}


def test_bash_completion_of_a_deep_tree(deep_dir: Path) -> None:
    script = deep_dir / docgen.BASH_FILE
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert bash_complete(script, "isrsync ") == [
        "plain",
        "one",
    ]  # typer lists commands, then groups
    assert bash_complete(script, "isrsync one ") == ["two"]
    assert bash_complete(script, "isrsync -v one t") == ["two"]
    assert bash_complete(script, "isrsync --color blue one two ") == ["leaf"]
    assert bash_complete(script, "isrsync -c ") == ["red", "blue"]
    assert bash_complete(script, "isrsync --color = ") == [
        "red",
        "blue",
    ]  # --color=<TAB>
    assert set(bash_complete(script, "isrsync one two leaf --")) == {
        "--force",
        "--no-force",
        "--tag",
        "--level",
        "--help",
    }
    assert bash_complete(script, "isrsync one two leaf --tag ") == bash_complete(
        script, "isrsync one two leaf "
    )


def _expect_everything(text: str, tree: docgen.Command) -> None:
    text = text.replace("\\[", "[").replace("\\]", "]")  # zsh's escaped brackets
    for cmd in tree.walk():
        for sub in cmd.subcommands:
            assert sub.name in text, sub.full_name
            if sub.short_help:
                assert sub.short_help.split("'")[0] in text, sub.full_name
        for opt in cmd.options:
            for name in opt.names:
                assert name.lstrip("-") in text, (cmd.full_name, name)
            if opt.help:
                assert docgen._short(opt.help).split("'")[0] in text, (
                    cmd.full_name,
                    opt.names,
                )


def test_zsh_completion(
    files: dict[str, str],
    tree: docgen.Command,
    deep_files: dict[str, str],
    deep_dir: Path,
) -> None:
    for text, t, where in (
        (files[docgen.ZSH_FILE], tree, REPO),
        (deep_files[docgen.ZSH_FILE], docgen.command_tree(deep_app()), deep_dir),
    ):
        assert text.startswith("#compdef isrsync\n")
        assert "_arguments" in text and "_describe" in text
        _expect_everything(text, t)
        for cmd in t.walk():
            for opt in cmd.options:
                for name in opt.names:
                    assert re.search(rf"[)'*]{re.escape(name)}[=+\[']", text), (
                        cmd.full_name,
                        name,
                    )
            if cmd.subcommands:
                assert (
                    f"_describe -t commands '{cmd.full_name} command' commands" in text
                )
        zsh = shutil.which("zsh")
        if zsh:
            r = subprocess.run(
                [zsh, "-n", str(where / docgen.ZSH_FILE)],
                check=False,
                capture_output=True,
                text=True,
            )
            assert r.returncode == 0, r.stderr
    deep = deep_files[docgen.ZSH_FILE]
    assert (
        "'(-c --color)--color=[Colour \\[red\\] or \\[blue\\]: pick one]:color:(red blue)'"
        in deep
    )
    assert "'(-f --force --no-force)--no-force[Force it]'" in deep
    assert "'*--tag=[A tag; give it again for more]:tag:_files'" in deep
    assert "'*-v[More output]'" in deep and "'*--verbose[More output]'" in deep
    assert "':name:_files'" in deep and "'*:paths:_files'" in deep


def fish_complete(script: Path, line: str) -> list[str]:
    r = subprocess.run(
        [
            "fish",
            "--no-config",
            "-c",
            f"source {shlex.quote(str(script))}; complete -C {shlex.quote(line)}",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return [w.split("\t")[0] for w in r.stdout.split("\n") if w]


def test_fish_completion(
    files: dict[str, str],
    tree: docgen.Command,
    deep_files: dict[str, str],
    deep_dir: Path,
) -> None:
    for text, t in (
        (files[docgen.FISH_FILE], tree),
        (deep_files[docgen.FISH_FILE], docgen.command_tree(deep_app())),
    ):
        _expect_everything(text, t)
        for cmd in t.walk():
            assert f"-n '__fish_isrsync_is \\'{cmd.full_name}\\''" in text, (
                cmd.full_name
            )
            for sub in cmd.subcommands:
                assert f"-f -a '{sub.name}'" in text
            for opt in cmd.options:
                for name in opt.names:
                    flag = (
                        f"-l '{name[2:]}'"
                        if name.startswith("--")
                        else f"-s '{name[1:]}'"
                    )
                    assert flag in text, (cmd.full_name, name)
    if shutil.which("fish"):
        for where in (REPO, deep_dir):
            r = subprocess.run(
                ["fish", "--no-execute", str(where / docgen.FISH_FILE)],
                check=False,
                capture_output=True,
                text=True,
            )
            assert r.returncode == 0, r.stderr
        script = REPO / docgen.FISH_FILE
        cache = next(c for c in tree.subcommands if c.name == "cache")
        assert {"info", "verify"} <= set(fish_complete(script, "isrsync cache "))
        assert sorted(fish_complete(script, "isrsync cache ")) == sorted(
            s.name for s in cache.subcommands
        )
        assert fish_complete(script, "isrsync --cache-dir /tmp ca") == ["cache"]
        deep = deep_dir / docgen.FISH_FILE
        assert fish_complete(deep, "isrsync -v one two ") == ["leaf"]
        assert sorted(fish_complete(deep, "isrsync --color ")) == ["blue", "red"]


def test_values_complete_by_type(deep_files: dict[str, str], deep_dir: Path) -> None:
    """Numbers complete to nothing, paths and strings to file names, choices to themselves."""
    zsh = deep_files[docgen.ZSH_FILE]
    assert "'--level=[How hard]:level: '" in zsh
    fish = deep_files[docgen.FISH_FILE]
    assert "-l 'level' -x -d 'How hard'" in fish and "-l 'tag' -r -F" in fish
    script = deep_dir / docgen.BASH_FILE
    (script.parent / "tagfile").write_text(
        ""
    )  # completion runs in the script's directory
    assert bash_complete(script, "isrsync one two leaf --level ") == []
    assert "tagfile" in bash_complete(script, "isrsync one two leaf --tag ")
    assert "tagfile" in bash_complete(script, "isrsync one two leaf x ")
    assert bash_complete(script, "isrsync plain ") == ["--help"]


class Policy(str, enum.Enum):
    auto = "auto"
    demand = "demand"
    lookaside = "lookaside"


def choice_app() -> typer.Typer:
    """A tiny CLI whose only interesting option is an Enum (a choice)."""
    app = typer.Typer(name="tiny", add_completion=False, rich_markup_mode=None)

    @app.callback()
    def root() -> None:
        pass

    @app.command("resume")
    def resume(
        parcel: Annotated[str, typer.Argument(help="The parcel.")],
        policy: Annotated[
            Policy, typer.Option("--policy", help="Transfer policy.")
        ] = Policy.auto,
    ) -> None:
        """Resume a parcel."""

    return app


def test_choice_options_complete_and_show_their_values(tmp_path: Path) -> None:
    """An Enum option (a choice) completes to its values in every shell, and
    the man page shows them as its metavar rather than a bare name."""
    files = docgen.generate(tmp_path, app=choice_app())
    assert set(files) == {
        "man/tiny.1",
        "man/tiny-resume.1",
        "completions/tiny.bash",
        "completions/_tiny",
        "completions/tiny.fish",
    }
    docgen.write(tmp_path, files)
    values = [p.value for p in Policy]

    man = files["man/tiny-resume.1"]
    assert "\\fB\\-\\-policy\\fR \\fI[auto|demand|lookaside]\\fR" in man
    assert "One of:" not in man  # said once, in the metavar
    assert "POLICY" not in man and "<str>" not in man
    check_man_pages({"man/tiny-resume.1": man}, tmp_path)

    bash = files["completions/tiny.bash"]
    assert "'tiny resume --policy') choices='auto demand lookaside' ;;" in bash
    script = tmp_path / "completions" / "tiny.bash"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert bash_complete(script, "tiny resume --policy ") == values
    assert bash_complete(script, "tiny resume --policy d") == ["demand"]
    assert bash_complete(script, "tiny resume --policy = ") == values  # --policy=<TAB>
    assert bash_complete(script, "tiny resume x --policy l") == ["lookaside"]

    zsh = files["completions/_tiny"]
    assert "'--policy=[Transfer policy]:policy:(auto demand lookaside)'" in zsh
    if shutil.which("zsh"):
        subprocess.run(
            ["zsh", "-n", str(tmp_path / "completions" / "_tiny")], check=True
        )

    fish = files["completions/tiny.fish"]
    assert "-l 'policy' -x -a 'auto demand lookaside' -d 'Transfer policy'" in fish
    if shutil.which("fish"):
        script = tmp_path / "completions" / "tiny.fish"
        assert sorted(fish_complete(script, "tiny resume --policy ")) == values
        assert fish_complete(script, "tiny resume --policy la") == ["lookaside"]

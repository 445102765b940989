"""Installing the udev rule and the systemd unit that attach media as they are plugged in.

Both files ship in ``sneakernet/data``. The unit names the sneakernet executable
by absolute path, because systemd runs it with no PATH of the user's (a venv's
console script is found nowhere else).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from isrsync.errors import StateError, UsageError

RULE_NAME = "85-sneakernet.rules"
UNIT_NAME = "sneakernet-attach@.service"
RULES_DIR = Path("etc/udev/rules.d")
UNITS_DIR = Path("etc/systemd/system")
EXE_MARK = "@SNEAKERNET@"


@dataclass
class InstallReport:
    written: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    reloaded: list[str] = field(default_factory=list)  # the reload commands that ran


def packaged(name: str) -> str:
    return resources.files("sneakernet").joinpath("data", name).read_text(encoding="utf-8")


def sneakernet_command() -> list[str]:
    """How systemd should run sneakernet: the console script beside this Python, else the module."""
    beside = Path(sys.executable).parent / "sneakernet"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside.absolute())]
    found = shutil.which("sneakernet")
    if found:
        return [str(Path(found).absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "sneakernet.cli"]


def _systemd_quote(word: str) -> str:
    # systemd.service(5): "%" starts a specifier; a word with spaces needs quotes.
    word = word.replace("%", "%%")
    if any(c in word for c in " \t\"'\\"):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def render_unit(command: list[str]) -> str:
    return packaged(UNIT_NAME).replace(EXE_MARK, " ".join(_systemd_quote(w) for w in command))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def targets(prefix: Path | None) -> tuple[Path, Path]:
    root = prefix if prefix is not None else Path("/")
    return root / RULES_DIR / RULE_NAME, root / UNITS_DIR / UNIT_NAME


def install(prefix: Path | None = None, *, command: list[str] | None = None,
            uninstall: bool = False) -> InstallReport:
    """Write (or remove) the rule and the unit under ``prefix`` (default: the live system).

    Only a live install reloads udevd and systemd: files under a prefix are for
    packaging and tests, and the running daemons must not read them.
    """
    rule, unit = targets(prefix)
    report = InstallReport()
    try:
        if uninstall:
            for path in (rule, unit):
                if path.exists():
                    path.unlink()
                    report.removed.append(path)
        else:
            _write(rule, packaged(RULE_NAME))
            _write(unit, render_unit(command or sneakernet_command()))
            report.written += [rule, unit]
    except PermissionError as e:
        raise UsageError(f"cannot write {e.filename}: permission denied",
                         hint="run it as root, or give --prefix") from None
    except OSError as e:
        raise StateError(f"cannot write {e.filename}: {e.strerror}") from None
    if prefix is None:
        report.reloaded = _reload()
    return report


def _reload() -> list[str]:
    ran: list[str] = []
    steps = []
    # systemd first: the rule's SYSTEMD_WANTS must name a unit systemd already knows.
    if Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        steps.append(["systemctl", "daemon-reload"])
    if Path("/run/udev/control").exists() and shutil.which("udevadm"):
        steps.append(["udevadm", "control", "--reload"])
    for argv in steps:
        r = subprocess.run(argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise StateError(f"`{shlex.join(argv)}` failed: {r.stderr.strip() or r.returncode}",
                             hint="the files are in place; reload by hand")
        ran.append(shlex.join(argv))
    return ran

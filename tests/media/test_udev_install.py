"""`sneakernet install-udev`: the packaged rule and unit, checked by udev itself.

The rule is tried with ``udevadm verify`` where systemd has it (253+), and always
with ``udevadm test`` on a real loop device, in a private mount namespace where
the prefix's rules directory stands in for /etc/udev/rules.d (so the machine's
udevd never reads the test's rule). ``udevadm test`` rewrites the udev database
entry of the device it is given (``--action=remove`` deletes it): only the
tests' own loop devices are given to it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from udevkit import LoopKit, loops, run, udevd  # noqa: F401 - fixtures

from sneakernet.udev import RULE_NAME, UNIT_NAME, render_unit

# systemd-udevd is one per machine, and a loop device one test plugs is an event for
# every watcher: these tests run on their own, after the parallel part (scripts/test).
pytestmark = pytest.mark.serial

RULES = Path("etc/udev/rules.d")
UNITS = Path("etc/systemd/system")


def sneakernet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sneakernet.cli", *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, check=False)


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    r = sneakernet("install-udev", "--prefix", str(root))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"wrote {root / RULES / RULE_NAME}", f"wrote {root / UNITS / UNIT_NAME}"]
    return root


def exec_lines(unit: str) -> dict[str, list[str]]:
    return {k: shlex.split(v) for k, _, v in (ln.partition("=") for ln in unit.splitlines())
            if k in ("ExecStart", "ExecStop")}


def test_the_unit_runs_this_sneakernet_by_absolute_path(prefix: Path) -> None:
    unit = (prefix / UNITS / UNIT_NAME).read_text()
    lines = exec_lines(unit)
    assert lines["ExecStart"][-2:] == ["attach", "/dev/%i"] and lines["ExecStop"][-2:] == ["detach", "/dev/%i"]
    command = lines["ExecStart"][:-2]
    assert Path(command[0]).is_absolute() and os.access(command[0], os.X_OK)
    assert Path(command[0]).name in ("sneakernet", Path(sys.executable).name)
    assert "BindsTo=dev-%i.device" in unit and "@SNEAKERNET@" not in unit
    # And that command really is sneakernet.
    r = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stdout.startswith("sneakernet ")


def test_an_odd_executable_path_is_quoted_for_systemd() -> None:
    lines = exec_lines(render_unit(["/opt/my tools/50%/sneakernet"]))
    assert lines["ExecStart"] == ["/opt/my tools/50%%/sneakernet", "attach", "/dev/%i"]


def test_uninstall_removes_both(prefix: Path) -> None:
    r = sneakernet("install-udev", "--prefix", str(prefix), "--uninstall")
    assert r.returncode == 0, r.stderr
    assert not (prefix / RULES / RULE_NAME).exists() and not (prefix / UNITS / UNIT_NAME).exists()
    assert len(r.stdout.splitlines()) == 2


def udevadm_test(prefix: Path, sys_path: Path, action: str) -> str:
    """``udevadm test`` with only the prefix's local rules, as a live install would read them."""
    if not Path("/etc/udev/rules.d").is_dir() or shutil.which("unshare") is None:
        pytest.skip("needs /etc/udev/rules.d to bind over and unshare(1)")
    script = f'mount --bind "$1" /etc/udev/rules.d && exec udevadm test --action={action} "$2"'
    r = run("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            str(prefix / RULES), str(sys_path), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert f"Reading rules file: /etc/udev/rules.d/{RULE_NAME}" in out
    complaints = [ln for ln in out.splitlines() if f"{RULE_NAME}:" in ln]
    assert not complaints, complaints
    return out


def test_udev_hands_a_filesystem_to_the_unit(prefix: Path, loops: LoopKit) -> None:
    loop = loops.plug_and_settle(loops.image("key"))
    for action in ("add", "change"):  # a USB key, a loop device
        out = udevadm_test(prefix, loop.sys_path, action)
        assert f"SYSTEMD_WANTS=sneakernet-attach@{loop.sys_name}.service" in out.splitlines(), action
        assert any(ln.startswith("TAGS=") and ":systemd:" in ln for ln in out.splitlines())


def test_udev_leaves_other_devices_alone(prefix: Path, loops: LoopKit) -> None:
    image = loops.root / "blank.img"
    with open(image, "wb") as f:
        f.truncate(4 * 1024 * 1024)
    blank = loops.plug(image)
    run("udevadm", "settle", "--timeout=10")
    out = udevadm_test(prefix, blank.sys_path, "change")
    assert "sneakernet-attach@" not in out
    key = loops.plug_and_settle(loops.image("key"))
    out = udevadm_test(prefix, key.sys_path, "remove")
    assert "sneakernet-attach@" not in out

#!/usr/bin/python3
"""The workload agent that runs INSIDE the Debian evaluation guest (python3, stdlib only).

It is copied into the guest's root as /usr/local/bin/isr-agent and started by
systemd on ttyS0 (isr-agent.service). It owns the console: the tty is put in
raw mode without echo, it reads one command per line and answers lines that
start with ``AGENT: `` (anything else on the console, kernel or systemd noise,
is to be ignored by the host).

Commands:
  ping                      -> AGENT: PONG <seconds since the agent started, by CLOCK_MONOTONIC>
  prepare                   -> the user's changes made before the first suspend (edits
                               a few documents, so the disk differs from the
                               original image a DVD would hold); AGENT: OK
  run <seed> <n> <think_ms> -> the CDA-like workload: n operations drawn from
                               <seed>, each followed by think time; after each
                               operation AGENT: OP <i> <kind> <seconds> <detail>,
                               at the end AGENT: DONE <n> <sum of op seconds> <wall seconds>
  sync                      -> AGENT: OK
  poweroff                  -> AGENT: BYE, then systemctl poweroff

The operation times are taken here, in the guest, with time.monotonic(): the
host's view of the guest (serial latency, link) does not enter them. Under a
migrated guest CLOCK_MONOTONIC goes on from where it was saved.
"""

import os
import random
import subprocess
import sys
import termios
import time
import tty

DATA = "/srv/data"
SCRATCH = "/var/tmp/isr-work"
T0 = time.monotonic()

# Programs started by the "launch" operation: each one's first start reads its
# binary and libraries from the disk (a demand fetch on a cold site).
LAUNCH = [
    ["python3", "-c", "import json, csv, zlib, sqlite3"],
    ["python3", "-c", "import email, http.client, xml.dom.minidom"],
    ["perl", "-e", "print 1"],
    ["xz", "--version"],
    ["bzip2", "--help"],
    ["gzip", "--version"],
    ["sort", "--version"],
    ["awk", "BEGIN{print 1}"],
    ["tar", "--version"],
    ["ps", "ax"],
    ["find", "/usr/share/zoneinfo", "-name", "Paris"],
    ["sed", "--version"],
]


def _docs():
    return sorted(n for n in os.listdir(os.path.join(DATA, "docs")) if n.endswith(".txt"))


def _run(argv, out=subprocess.DEVNULL):
    return subprocess.run(argv, stdout=out, stderr=subprocess.DEVNULL, check=False).returncode


def op_launch(rnd):
    argv = rnd.choice(LAUNCH)
    _run(argv)
    return argv[0]


def op_open(rnd):
    name = rnd.choice(_docs())
    with open(os.path.join(DATA, "docs", name), "rb") as f:
        n = len(f.read())
    return f"{name}:{n}"


def op_search(rnd):
    name = rnd.choice(_docs())
    word = rnd.choice(["budget", "quarterly", "customer", "invoice", "delta", "report", "zebra"])
    _run(["grep", "-c", "-i", word, os.path.join(DATA, "docs", name)])
    return f"{name}:{word}"


def op_search_all(rnd):
    word = rnd.choice(["contract", "forecast", "margin"])
    _run(["grep", "-r", "-l", word, os.path.join(DATA, "docs")])
    return word


def op_sort(rnd):
    col = rnd.choice([2, 3, 4])
    _run(["sort", "-t", ",", f"-k{col},{col}", "-o", os.path.join(SCRATCH, "sorted.csv"),
          os.path.join(DATA, "sheet.csv")])
    return f"col{col}"


def op_edit(rnd):
    name = rnd.choice(_docs())
    path = os.path.join(DATA, "docs", name)
    with open(path, "rb") as f:
        text = f.read()
    cut = rnd.randrange(max(1, len(text)))
    text = text[:cut] + b" edited %d " % rnd.randrange(1 << 30) + text[cut:]
    with open(path, "wb") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return name


def op_compress(rnd):
    name = rnd.choice(_docs())
    prog = rnd.choice(["gzip", "bzip2", "xz"])
    with open(os.path.join(SCRATCH, name + "." + prog), "wb") as out:
        _run([prog, "-c", os.path.join(DATA, "docs", name)], out=out)
    return f"{prog}:{name}"


# The mix, by weight: roughly the paper's CDA (office programs started, documents
# opened, searched, edited and saved, a spreadsheet recomputed, files archived).
OPS = [(op_launch, 20), (op_open, 25), (op_search, 20), (op_search_all, 3), (op_sort, 7), (op_edit, 15),
       (op_compress, 10)]


def plan(seed, n):
    """The operation kinds, drawn once from the seed so every run does the same."""
    rnd = random.Random(seed)
    kinds = [f for f, w in OPS for _ in range(w)]
    return [rnd.choice(kinds) for _ in range(n)]


def run(out, seed, n, think):
    os.makedirs(SCRATCH, exist_ok=True)
    rnd = random.Random(seed * 7919 + 1)
    total = 0.0
    w0 = time.monotonic()
    for i, fn in enumerate(plan(seed, n)):
        t0 = time.monotonic()
        detail = fn(rnd)
        dt = time.monotonic() - t0
        total += dt
        out(f"OP {i} {fn.__name__[3:]} {dt:.4f} {detail}")
        time.sleep(think)
    os.sync()
    out(f"DONE {n} {total:.4f} {time.monotonic() - w0:.4f}")


def prepare(rnd_seed=1):
    rnd = random.Random(rnd_seed)
    for _ in range(5):
        op_edit(rnd)


def main():
    dev = sys.argv[1] if len(sys.argv) > 1 else "/dev/ttyS0"
    fd = os.open(dev, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, attrs)

    def out(line):
        os.write(fd, ("AGENT: " + line + "\n").encode())

    out("READY")
    buf = b""
    while True:
        data = os.read(fd, 4096)
        if not data:
            time.sleep(0.1)
            continue
        buf += data.replace(b"\r", b"\n")
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            words = raw.decode(errors="replace").split()
            if not words:
                continue
            cmd = words[0]
            try:
                if cmd == "ping":
                    out(f"PONG {time.monotonic() - T0:.3f}")
                elif cmd == "prepare":
                    prepare()
                    os.sync()
                    out("OK")
                elif cmd == "run":
                    run(out, int(words[1]), int(words[2]), int(words[3]) / 1000.0)
                elif cmd == "sync":
                    os.sync()
                    out("OK")
                elif cmd == "poweroff":
                    os.sync()
                    out("BYE")
                    subprocess.Popen(["systemctl", "poweroff"])
                else:
                    out(f"ERR unknown {cmd}")
            except Exception as e:  # one reply per command, whatever went wrong
                out(f"ERR {type(e).__name__} {e}")


if __name__ == "__main__":
    main()

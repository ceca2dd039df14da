"""Instructions per request, counted by valgrind: the worker-CPU comparison that the
machine's noise cannot move.

    .venv/bin/python loadtest/ir_probe.py [--ref REF] [--paths bare,not_open,sold_out,grant]
                                          [--small 1000] [--large 4000]

On 2 shared cores a CPU-time probe (inproc_probe.py, bench.py) moves by 10-30 % from
one run to the next, more than most single changes are worth. This runs
``inproc_probe.py`` under ``valgrind --tool=cachegrind --cache-sim=no`` (about 20x
slower, deterministic to a few parts in ten thousand) for one path at a time, with
``--small`` and then ``--large`` requests, and takes the difference of the two
programs' instruction counts over the difference of their requests: start-up,
imports, Redis's loading and the warm-up cancel out. What the probe's client does per
request (minting the token, building the bytes) is counted the same way on its own and
subtracted. Redis is another process and is not counted, nor is the kernel.

``--ref REF`` also counts the tree of git revision REF (``git archive`` into a
temporary folder, its own ``inproc_probe.py`` and its own engine), alternating with
this checkout, and prints both side by side.

Needs valgrind (Debian package ``valgrind``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_IREFS = re.compile(r"I\s+refs:\s+([\d,]+)")
# The probe's client work per request, without any server.
_CLIENT = """
import sys
sys.path.insert(0, {loadtest!r})
from inproc_probe import SECRET, request_bytes
from engine.auth import mint_member_token
reqs = [request_bytes("/v1/rounds/R1/grab", mint_member_token(SECRET, f"m{{i}}", 7200), "V01")
        for i in range(int(sys.argv[1]))]
"""


def instructions(argv: list[str], cwd: Path) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no",
         "--cachegrind-out-file=/dev/null", *argv],
        cwd=cwd, capture_output=True, text=True, timeout=1800, check=True)
    m = _IREFS.search(out.stderr)
    if m is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
    return int(m.group(1).replace(",", ""))


def per_request(tree: Path, path: str | None, small: int, large: int,
                extra: list[str] = []) -> float:  # noqa: B006 - never mutated
    """Instructions per request of ``path`` in ``tree`` (None: the client alone);
    ``extra``: more arguments for inproc_probe.py."""
    counts = []
    for n in (small, large):
        if path is None:
            argv = [sys.executable, "-c", _CLIENT.format(loadtest=str(tree / "loadtest")),
                    str(n)]
        else:
            argv = [sys.executable, str(tree / "loadtest" / "inproc_probe.py"), "--paths",
                    path, "--requests", str(n), "--rounds", "1", "--gc-freeze", *extra]
        counts.append(instructions(argv, tree))
    return (counts[1] - counts[0]) / (large - small)


def archive(ref: str, into: Path) -> Path:
    data = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True,
                          check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    # The package's scripts, as the installed package maps them (pyproject's
    # package-dir): without the link the editable install would serve this
    # checkout's lua/ to the other tree.
    (into / "engine" / "lua").symlink_to("../lua")
    return into


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ref", help="also count this git revision's tree")
    p.add_argument("--paths", default="bare,not_open,sold_out,grant")
    p.add_argument("--small", type=int, default=1000)
    p.add_argument("--large", type=int, default=4000)
    p.add_argument("--probe-args", default="",
                   help="more arguments for inproc_probe.py, e.g. '--connections 4000 "
                        "--gc-threshold 700,10,10'")
    args = p.parse_args()
    extra = args.probe_args.split()
    if shutil.which("valgrind") is None:
        print("ir_probe: valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="coupon-ir-"))
    try:
        trees = {"this": ROOT}
        if args.ref:
            trees = {args.ref: archive(args.ref, tmp / "ref"), "this": ROOT}
        paths = args.paths.split(",")
        result: dict[str, dict[str, float]] = {name: {} for name in trees}
        for name, tree in trees.items():
            # The engine package is imported from the tree's own folder (cwd first on
            # sys.path for -c, the script's parent for the probe).
            result[name]["client"] = per_request(tree, None, args.small, args.large)
            print(f"  {name} client: {result[name]['client']:,.0f}", flush=True)
        for path in paths:
            for name, tree in trees.items():
                result[name][path] = per_request(tree, path, args.small, args.large,
                                                 extra) - result[name]["client"]
                print(f"  {name} {path}: {result[name][path]:,.0f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    names = list(trees)
    print("| path | " + " | ".join(f"{n}: instructions/request (x bare)" for n in names)
          + (" | this / ref |" if len(names) > 1 else " |"))
    print("|---|" + "---:|" * (len(names) + (1 if len(names) > 1 else 0)))
    for path in paths:
        cells = []
        for n in names:
            bare = result[n].get("bare")
            ratio = f" ({result[n][path] / bare:.2f})" if bare else ""
            cells.append(f"{result[n][path]:,.0f}{ratio}")
        extra = (f" | {result['this'][path] / result[names[0]][path]:.3f}"
                 if len(names) > 1 else "")
        print(f"| {path} | " + " | ".join(cells) + extra + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

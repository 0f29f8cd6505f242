"""Summarise the folded stacks of ``py-spy record --format raw`` (what ``scale.py
--profile DIR`` writes): the frames that hold the most samples, inclusive and self.

    python benchmarks/profile_summary.py prof/hub-steady-postgresql-1000.txt [--top 25]

Samples are wall-clock samples of threads py-spy did not judge idle (at the script's
50 per second); a thread blocked in a C call it does not know as idle (a database
driver's wait, ``epoll``) counts as busy.  Not a test: it prints.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>.*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """``func (path:line)`` as ``func (package/module.py)``, without the line."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = re.sub(r".*/site-packages/", "", m["path"])
    return f"{m['func']} ({path})"


def summarise(
    lines: list[str], names: tuple[str, ...] = ()
) -> tuple[int, collections.Counter, collections.Counter, collections.Counter]:
    """Total samples, samples per frame anywhere on the stack, samples per top frame, and
    samples per name in ``names`` with a frame starting with it on the stack."""
    inclusive: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    under: collections.Counter = collections.Counter()
    total = 0
    for line in lines:
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";")]
        total += n
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n
        for name in names:
            if any(f.startswith(name) for f in frames):
                under[name] += n
    return total, inclusive, own, under


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stacks", help="a py-spy raw (folded) file")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--rate", type=int, default=50, help="py-spy's samples per second")
    ap.add_argument(
        "--frames",
        nargs="+",
        default=[],
        metavar="NAME",
        help="also the samples with a frame whose name starts with NAME on their stack "
        "(e.g. User.stop SlurmSSHSpawner.stop)",
    )
    args = ap.parse_args()
    with open(args.stacks) as f:
        total, inclusive, own, under = summarise(f.readlines(), tuple(args.frames))
    print(f"{args.stacks}: {total} samples ({total / args.rate:.1f} s at {args.rate}/s)")
    for name in args.frames:
        print(f"{under[name]:7d} {100 * under[name] / max(1, total):5.1f}%  under {name}*")
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"-- {title}")
        for frame, n in counter.most_common(args.top):
            print(f"{n:7d} {100 * n / max(1, total):5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

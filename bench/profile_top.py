"""Where a server's time went: the functions that take the largest share of a py-spy recording.

    .venv/bin/python bench/profile_top.py PROFILE.txt [--under FUNCTION] [--top 25]

``PROFILE.txt`` is py-spy's ``--format raw`` output (collapsed stacks, as ``bench/rpc_bench.py --py-spy``
writes). Prints each function's inclusive share (it or anything it calls is running) and self share (it is
the innermost frame), of all samples or, with ``--under``, of the samples whose stack passes through a
function whose name contains FUNCTION.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def _frames(stack: str) -> list[str]:
    # A frame reads "function (file.py:line)"; the line is dropped so a function counts once.
    return [
        frame.split(" (")[0] + " (" + frame.rsplit("/", 1)[-1].split(":")[0] for frame in stack.split(";")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("profile", type=Path)
    parser.add_argument("--under", default="", help="only stacks through a function with this in its name")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in args.profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = _frames(stack)
        if args.under and not any(args.under in frame.split(" (")[0] for frame in frames):
            continue
        samples = int(count)
        total += samples
        for frame in set(frames):
            inclusive[frame] += samples
        own[frames[-1]] += samples
    if not total:
        raise SystemExit("no samples matched")
    print(f"{total} samples{f' under {args.under}' if args.under else ''}")
    print(f"{'incl %':>7} {'self %':>7}  function (file)")
    for frame, samples in inclusive.most_common(args.top):
        print(f"{100 * samples / total:7.1f} {100 * own[frame] / total:7.1f}  {frame})")
    print("\nlargest self shares:")
    for frame, samples in own.most_common(args.top):
        print(f"{100 * inclusive[frame] / total:7.1f} {100 * samples / total:7.1f}  {frame})")


if __name__ == "__main__":
    main()

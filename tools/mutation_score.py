"""Mutation score per module from ``mutmut results --all true`` on stdin (used by ``make mutate``).

Counts only the mutants that were run: ``not checked`` ones (outside the Makefile's MUTANTS) are left out.
The score is the share of run mutants that some test caught (killed, or stopped by a timeout); ``no tests``
counts against it, since no fast test reaches that code. Prints one line per module, then the survivors.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict

LINE = re.compile(r"^\s*(?P<name>(?P<module>[\w.]+?)\.x[\u01c1_]\S*): (?P<status>.+?)\s*$")
CAUGHT = {"killed", "timeout"}


def main() -> int:
    per: dict[str, Counter] = defaultdict(Counter)
    survivors: list[str] = []
    for line in sys.stdin:
        m = LINE.match(line)
        if not m or m["status"] == "not checked":
            continue
        per[m["module"]][m["status"]] += 1
        if m["status"] not in CAUGHT:
            survivors.append(f"{m['status']}: {m['name']}")
    if not per:
        print("no mutants were run", file=sys.stderr)
        return 1
    print(f"{'module':32} {'run':>5} {'caught':>6} {'survived':>8} {'no tests':>8} {'other':>5}  score")
    for module, c in sorted(per.items()):
        run = sum(c.values())
        caught = sum(c[s] for s in CAUGHT)
        other = run - caught - c["survived"] - c["no tests"]
        print(f"{module:32} {run:5} {caught:6} {c['survived']:8} {c['no tests']:8} {other:5}  {caught / run:6.1%}")
    if survivors:
        print(f"\n{len(survivors)} not caught (see one with: mutmut show NAME):")
        print("\n".join(sorted(survivors)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

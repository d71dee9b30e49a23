"""Print, per recorded scenario, the sentences spoken vs translated (for before/after figures).

    .venv/bin/python -m tests.conformance.summary [scenario ...]

Replays the scenarios at once (each against its own scheduler process, default configuration plus
the recording's config_env) and prints one line each, then each failing scenario's first failure.
"""

from __future__ import annotations

import asyncio
import sys

from tests.conformance.recording import load, scenario_names
from tests.conformance.replay import replay_all
from tests.conformance.verdict import judge


def main(argv: list[str]) -> int:
    names = argv or scenario_names()
    runnable = [n for n in names if load(n).skip_reason is None]
    transcripts = asyncio.run(replay_all(runnable))
    print(f"{'scenario':28} {'spoken':>6} {'translated':>10} {'popups':>6}  verdict")
    details: list[str] = []
    for name in names:
        sc = load(name)
        if sc.skip_reason is not None:
            print(f"{name:28} {'-':>6} {'-':>10} {'-':>6}  skipped ({sc.skip_reason})")
            continue
        v = judge(sc, transcripts[name])
        print(f"{name:28} {v.spoken:>6} {v.translated:>10} {len(v.popups):>6}  {'PASS' if v.ok else 'FAIL'}")
        if not v.ok:
            details.append(f"{name}: {v.failures[0]}")
    if details:
        print()
        print("\n".join(details))
    return 0 if not details else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Checks a kosoku/Autobahn report and prints a summary by case group.

    autobahn_summary.py INDEX.json [--expect N] [--groups 1,2,...] [--too-big GLOB,...]
                        [--section NAME] [--write-summary]

Exits non-zero unless every case in the required groups (1-10 and 12-13, or
those --groups names) is OK, NON-STRICT or INFORMATIONAL, and (with --expect)
the report holds exactly N cases. Cases that match a --too-big glob send a
message over the server's max_message_size: each must instead be closed by
the server with 1009, whatever Autobahn calls that. With
--write-summary, replaces the table between the markers of the section (by
default the server's; `--section client` for the client's) in
docs/conformance.md.
"""

import collections
import fnmatch
import json
import pathlib
import sys

ACCEPTED = {"OK", "NON-STRICT", "INFORMATIONAL"}
REQUIRED_GROUPS = [str(g) for g in (1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 13)]


def option(name: str) -> str | None:
    """The value after `name` on the command line, if it is there."""
    args = sys.argv[2:]
    return args[args.index(name) + 1] if name in args else None


def main() -> int:
    index = json.loads(pathlib.Path(sys.argv[1]).read_text())
    expected = option("--expect")
    section = option("--section")
    marker = "autobahn-summary" if section is None else f"autobahn-{section}-summary"
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    groups = option("--groups")
    required = groups.split(",") if groups else REQUIRED_GROUPS
    too_big = (option("--too-big") or "").split(",")
    (cases,) = index.values()
    by_group = collections.defaultdict(collections.Counter)
    bad = []
    closed_too_big = 0
    for case, result in cases.items():
        group = case.split(".")[0]
        by_group[group][result["behavior"]] += 1
        # An UNCLEAN close (TCP ended without a close handshake) is what a failed
        # connection looks like in the fail-fast cases; only FAILED fails.
        if any(fnmatch.fnmatchcase(case, glob) for glob in too_big if glob):
            if result.get("remoteCloseCode") != 1009:
                bad.append(f"{case}: expected a 1009 close, got {result.get('remoteCloseCode')}")
            closed_too_big += 1
            continue
        if result["behavior"] not in ACCEPTED or result["behaviorClose"] == "FAILED":
            bad.append(f"{case}: behavior={result['behavior']} close={result['behaviorClose']}")
    missing = [g for g in required if g not in by_group]

    lines = ["| group | cases | OK | NON-STRICT | INFORMATIONAL | other |", "|---|---|---|---|---|---|"]
    for group in sorted(by_group, key=int):
        c = by_group[group]
        other = sum(n for k, n in c.items() if k not in ACCEPTED)
        lines.append(
            f"| {group}.* | {sum(c.values())} | {c['OK']} | {c['NON-STRICT']} | {c['INFORMATIONAL']} | {other} |"
        )
    table = "\n".join(lines)
    print(table)
    print(f"autobahn: {len(cases) - len(bad)} passed, {len(bad)} failed")
    if too_big != [""]:
        print(f"  of the passed, {closed_too_big} sent a message over max_message_size and were closed with 1009")

    if "--write-summary" in sys.argv:
        doc = pathlib.Path("docs/conformance.md")
        text = doc.read_text()
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        doc.write_text(f"{head}{begin}\n{table}\n{end}{tail}")

    for line in bad:
        print("FAILED", line)
    if missing:
        print("missing case groups:", ", ".join(missing))
    miscounted = expected is not None and len(cases) != int(expected)
    if miscounted:
        print(f"the report holds {len(cases)} cases, not {expected}")
    return 1 if bad or missing or miscounted else 0


if __name__ == "__main__":
    sys.exit(main())

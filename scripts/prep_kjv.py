#!/usr/bin/env python3
"""Turn the output of `bible Gen1:1-Rev22:21` (Debian's bible-kjv) into training text: a heading line
per chapter ("Genesis 1"), then one verse per line without its number, a blank line between chapters.

    bible Gen1:1-Rev22:21 | python3 scripts/prep_kjv.py > kjv.txt
"""

import re
import sys

VERSE = re.compile(r"^\s+\d+\s+(.*)$")


def convert(lines: list[str]) -> str:
    out: list[str] = []
    for raw in lines:
        line = raw.rstrip()
        if not line:
            continue
        m = VERSE.match(line)
        if m:
            out.append(m.group(1))
        elif line[0].isspace() or not re.search(r"\d+$", line):
            out[-1] += " " + line.strip()  # a wrapped verse continues
        elif not out or out[-1] == "":
            out += [line]
        else:
            out += ["", line]  # a chapter heading
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(convert(sys.stdin.read().splitlines()))

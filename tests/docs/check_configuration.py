#!/usr/bin/env python3
"""Checks that docs/CONFIGURATION.md lists every option of the public option
structs with the default its header states.

For each struct below, every data member must have a comment above it that
says "Default: ..." (or "Required."), and docs/CONFIGURATION.md must have, in
the section headed with the struct's name, a table row whose first cell is the
member's name in backticks and whose second cell contains that default text.
A field added to a header without its row, a row without its field, or a
default changed on one side only fails the test.

Usage: check_configuration.py <source dir>
"""
import re
import sys
from pathlib import Path

STRUCTS = [
    ("include/parley/options.h", "Options"),
    ("include/parley/storage.h", "RocksDbStorageOptions"),
    ("include/parley/delivery.h", "AttachOptions"),
]


def struct_body(text, name):
    m = re.search(r"^struct %s \{\n(.*?)^\};" % re.escape(name), text,
                  re.M | re.S)
    if not m:
        raise SystemExit(f"struct {name} not found")
    return m.group(1)


def fields(body):
    """Yields (name, comment text) for each data member."""
    comment = []
    for raw in body.splitlines():
        line = raw.strip()
        if line.startswith("//"):
            comment.append(line[2:].strip())
            continue
        if not line:
            comment = []
            continue
        # A declaration: skip functions, keep "type name [= x | {x}];".
        if "(" in line.split("=")[0].split("{")[0] or not line.endswith(";"):
            comment = []
            continue
        decl = re.split(r"\s*(?:=|\{)", line, maxsplit=1)[0].rstrip(";")
        name = decl.split()[-1]
        yield name, " ".join(comment)
        comment = []


def default_of(comment):
    if re.search(r"\bRequired\.", comment):
        return "Required"
    m = re.search(r"Default: (.*?)(?:\.\s|\.$|$)", comment)
    return m.group(1).strip() if m else None


def doc_rows(doc, section):
    m = re.search(r"^## `%s`.*?$(.*?)(?=^## |\Z)" % re.escape(section), doc,
                  re.M | re.S)
    if not m:
        return None
    rows = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def norm(s):
    return re.sub(r"[\s`]+", " ", s).strip().lower()


def main():
    root = Path(sys.argv[1])
    doc = (root / "docs/CONFIGURATION.md").read_text()
    errors = []
    checked = 0
    for header, struct in STRUCTS:
        body = struct_body((root / header).read_text(), struct)
        rows = doc_rows(doc, struct)
        if rows is None:
            errors.append(f"docs/CONFIGURATION.md has no section `{struct}`")
            continue
        seen = set()
        for name, comment in fields(body):
            seen.add(name)
            checked += 1
            default = default_of(comment)
            if default is None:
                errors.append(f"{header}: {struct}::{name} states no "
                              "'Default: ...' (or 'Required.')")
                continue
            if name not in rows:
                errors.append(f"docs/CONFIGURATION.md: `{struct}` has no row "
                              f"for `{name}` (default: {default})")
            elif norm(default) not in norm(rows[name]):
                errors.append(f"docs/CONFIGURATION.md: `{struct}.{name}` "
                              f"default is '{rows[name]}', the header says "
                              f"'{default}'")
        for name in rows:
            if name not in seen:
                errors.append(f"docs/CONFIGURATION.md: `{struct}.{name}` is "
                              f"not a field of {struct} ({header})")
    for e in errors:
        print(e)
    print(f"{checked} options checked, {len(errors)} problems")
    return 1 if errors or checked == 0 else 0


if __name__ == "__main__":
    sys.exit(main())

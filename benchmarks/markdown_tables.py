"""Reading the markdown tables the benchmarks write."""


def table(text, header_start):
    """`(header, rows)` of the first markdown table in `text` whose header
    starts with `header_start`; each row a list of stripped cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| " + header_start))
    return _read(lines, start)


def tables(text):
    """Every markdown table in `text`, in order: `(heading, header, rows)`,
    `heading` the last markdown heading line above it ('' if none)."""
    lines = text.splitlines()
    found, heading = [], ""
    for i, line in enumerate(lines):
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|") and not (i and lines[i - 1].startswith("|")):
            found.append((heading, *_read(lines, i)))
    return found


def _read(lines, start):
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    header, separator, *body = rows
    assert set(separator) == {"---"}, separator
    return header, body

"""Writing a benchmark's markdown report: to its file, and to the terminal."""


def write(text, path):
    """Writes `text` to `path`, prints it, then where it went."""
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"written to {path}")

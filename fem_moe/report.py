"""Measuring and reporting: resident memory, plain-text tables, files written atomically.

No Firedrake or torch here: the benchmarks' parent processes use it too.
"""
import os

__all__ = ["peak_rss_mb", "reset_peak_rss", "print_table", "write_atomic"]


def peak_rss_mb():
    """This process's resident-memory high-water mark (VmHWM), MiB; NaN where the kernel does not
    report it (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss():
    """Restart the high-water mark (Linux >= 4.0), so that the next reading is the peak of what
    follows. Returns whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def print_table(rows, columns, title=None, file=None):
    """``rows`` (dicts) as a right-aligned table; ``columns``: (key, header, format) triples. A
    missing or None entry prints as "-". Call on one rank."""
    cells = [[h for _, h, _ in columns]]
    cells += [["-" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in columns]
              for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    if title:
        print(title, file=file)
    for j, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)), file=file)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=file)


def write_atomic(path, write):
    """Write ``path`` through ``write(binary file)`` into a temporary file that is then renamed
    over it: an interruption leaves the previous file whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

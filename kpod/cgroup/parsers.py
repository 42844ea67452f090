"""Pure parsers for the cgroup, /proc and /sys files the cgroup receivers read.

One small function per file format, in the style of psutil: text in, plain data out, no I/O.
None of them raises on odd input.  The kernel writes these files in a fixed shape, but a
reader can still see a truncated read (a cgroup removed mid-read), a field added by a newer
kernel, or bytes decoded with replacement characters; a malformed line is skipped and the
lines that parsed are returned.  Functions whose callers may care report how many lines they
skipped.

Units are the kernel's: microseconds for PSI and cpu.stat, bytes for io and memory.

Lines end at "\n" and nowhere else: the kernel ends its lines with "\n" and does not escape
other control bytes in the names it prints (interface names, mount points, filesystem types
of FUSE mounts), while str.splitlines() also breaks at "\r", "\x0b", "\x0c", "\x1c"-"\x1e",
U+0085 and U+2028.  A pod could otherwise cut a line of its own interface or mount in two,
hide the real line behind it, or forge a second one (tests/test_hostile_names.py).

Every line (or io.stat pair) a parser skips is also counted, by parser, for the whole process
(kpod.selfmetrics.count_parser_skip); the pipeline exports it as
kpod_parser_skipped_lines_total{parser}, so that a kernel whose format changed shows up as a
rising counter instead of silently missing data.  Only the skip branches count: the
well-formed path costs nothing more.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from kpod.selfmetrics import count_parser_skip

_skipped_here = threading.local()  # lines skipped in each thread: skipped_in_this_thread


def _skip(parser: str, lines: int = 1) -> None:
    count_parser_skip(parser, lines)
    _skipped_here.lines = getattr(_skipped_here, "lines", 0) + lines


def skipped_in_this_thread() -> int:
    """Lines the parsers skipped in the calling thread so far: a caller that remembers what a
    parser returned (kpod.cgroup.files.ParseMemo) tells a clean parse from one that skipped."""
    return getattr(_skipped_here, "lines", 0)


# A device number as (major, minor): the key of io.stat and blkio lines, and of /sys/dev/block.
DevNum = tuple[int, int]

def _int(text: str) -> int | None:
    """A base-10 integer, or None.  Only ASCII digits with an optional sign, unlike int()."""
    # int() accepts "1_000", " 12 " and non-ASCII digits; none of those is a kernel number.
    body = text[1:] if text[:1] in ("-", "+") else text
    if not body or not body.isascii() or not body.isdigit():
        return None
    return int(text)


def parse_devnum(text: str) -> DevNum | None:
    """ "254:0" -> (254, 0), or None."""
    major, sep, minor = text.partition(":")
    if not sep:
        return None
    ma, mi = _int(major), _int(minor)
    if ma is None or mi is None or ma < 0 or mi < 0:
        return None
    return ma, mi


# --------------------------------------------------------------------------------------------
# Flat-keyed files: "key value" per line (cpu.stat, memory.stat v1 and v2, memory.events).


def parse_flat_keyed(text: str) -> tuple[dict[str, int], int]:
    """Parse a flat-keyed file into ({key: value}, skipped_lines).

    A line must be exactly two fields, a key and an integer.  Unknown keys are kept (a newer
    kernel adds fields; callers pick what they know).  If a key repeats, the last one wins.
    """
    if _FLAT_FILE.fullmatch(text) is not None:
        # The kernel's shape, checked by one regex: every line "key digits\n", so the file's
        # words alternate key, value (this runs for every cpu.stat of the node each cycle).
        words = iter(text.split())
        return dict(zip(words, map(int, words), strict=True)), 0
    return _parse_flat_keyed_lines(text)


# Every line one key (no whitespace in it: str.split and the regex's \S agree on what
# whitespace is), one space and ASCII digits; an empty file too.
_FLAT_FILE = re.compile(r"(?:\S+ [0-9]+\n)*")


def _parse_flat_keyed_lines(text: str) -> tuple[dict[str, int], int]:
    """parse_flat_keyed line by line: any text, every odd line counted."""
    values: dict[str, int] = {}
    skipped = 0
    for line in text.split("\n"):
        fields = line.split()
        if len(fields) != 2:
            skipped += bool(fields)
            continue
        raw = fields[1]
        # Inlined _int: this loop runs for every line of every memory.stat of the node.
        digits = raw[1:] if raw[:1] == "-" else raw
        if digits.isdigit() and digits.isascii():
            values[fields[0]] = int(raw)
        else:
            skipped += 1
    if skipped:
        _skip("flat_keyed", skipped)
    return values, skipped


def parse_flat_keyed_value(text: str, key: str) -> int | None:
    """The value of one key of a flat-keyed file, or None; same rules as parse_flat_keyed.

    For receivers that need one field of a 50-line file (memory.stat's inactive_file): a
    substring search instead of parsing every line.
    """
    needle = "\n" + key + " "
    start = 0 if text.startswith(key + " ") else text.find(needle) + 1
    while start > 0 or text.startswith(key + " "):
        end = text.find("\n", start)
        fields = text[start : end if end >= 0 else len(text)].split()
        value = _int(fields[1]) if len(fields) == 2 and fields[0] == key else None
        if value is not None or end < 0:
            return value
        # A malformed line with this key (which parse_flat_keyed skips): count, look further.
        _skip("flat_keyed")
        start = text.find(needle, end) + 1
        if start == 0:
            return None
    return None


def parse_cpu_stat(text: str) -> dict[str, int]:
    """cgroup2 cpu.stat: usage_usec, user_usec, system_usec, and with the cpu controller
    nr_periods, nr_throttled, throttled_usec, nr_bursts, burst_usec (6.1); 6.18 adds nice_usec.

    Keys are returned as in the file; which ones exist depends on kernel and controller.
    """
    return parse_flat_keyed(text)[0]


def parse_single_int(text: str) -> int | None:
    """A one-value file (memory.current, memory.usage_in_bytes): the integer, or None.

    None also for "max" (memory.max without a limit) and for an empty or garbled file.
    """
    if text[-1:] == "\n" and text[:-1].isdigit() and text.isascii():
        return int(text)  # the kernel's "%llu\n"
    fields = text.split()
    if len(fields) != 1:
        if fields:
            _skip("single_int")
        return None
    value = _int(fields[0])
    if value is None and fields[0] != "max":
        _skip("single_int")
    return value


# --------------------------------------------------------------------------------------------
# Block I/O.


def parse_io_stat(text: str) -> dict[DevNum, dict[str, int]]:
    """cgroup2 io.stat: "MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. dbytes=.. dios=.." per device.

    Returns {(major, minor): {key: value}}.  Keys beyond the six base ones (cost.*, latency
    keys of iocost/iolatency) are kept.  A malformed key=value pair is dropped on its own;
    a line without a valid device number is skipped.  An empty file means no I/O.
    """
    devices: dict[DevNum, dict[str, int]] = {}
    for line in text.split("\n"):
        fields = line.split()
        if not fields:
            continue
        dev = parse_devnum(fields[0])
        if dev is None:
            _skip("io_stat")
            continue
        stats: dict[str, int] = {}
        for pair in fields[1:]:
            key, sep, raw = pair.partition("=")
            value = _int(raw) if sep and key else None
            if value is not None:
                stats[key] = value
            else:
                _skip("io_stat")  # one malformed pair; the rest of the line is kept
        if stats:
            devices[dev] = stats
    return devices


# The operations a blkio.throttle.* line carries, as the kernel spells them.
BLKIO_OPS = ("Read", "Write", "Sync", "Async", "Discard", "Total")


def parse_blkio_throttle(text: str) -> dict[DevNum, dict[str, int]]:
    """cgroup v1 blkio.throttle.io_service_bytes / io_serviced: "MAJ:MIN Op value" lines.

    Returns {(major, minor): {"Read": n, "Write": n, ...}}.  The closing "Total N" line (no
    device) is a sum and is not returned.  A file that is only "Total 0" returns {}: on recent
    kernels these counters are only kept on devices that have a throttle rule, so an empty
    result means NO DATA, not "no I/O" (see tests/fixtures/README.md, surprise 1).
    """
    devices: dict[DevNum, dict[str, int]] = {}
    for line in text.split("\n"):
        fields = line.split()
        if len(fields) != 3 or fields[1] not in BLKIO_OPS:
            # The closing "Total N" line and blank lines are the format, not damage.
            if fields and not (len(fields) == 2 and fields[0] == "Total"):
                _skip("blkio_throttle")
            continue
        dev = parse_devnum(fields[0])
        value = _int(fields[2])
        if dev is None or value is None:
            _skip("blkio_throttle")
            continue
        devices.setdefault(dev, {})[fields[1]] = value
    return devices


# --------------------------------------------------------------------------------------------
# Pressure stall information.


def parse_pressure_totals(text: str) -> dict[str, int]:
    """The cumulative `total=` of each line of a *.pressure file: {"some": usec, "full": usec}.

    Lines are "some avg10=.. avg60=.. avg300=.. total=.." and "full ..." (cpu "full" exists at
    cgroup level since 5.13, irq.pressure has only "full"); whichever exist are returned.  A line
    without a valid `total` is skipped.  The averages are not parsed: the counters need only the
    total, and this runs for three files of every cgroup of the node per cycle.
    """
    shaped = _PSI_FILE.fullmatch(text)
    if shaped is not None:  # the kernel's shape, checked by one regex
        some, full = shaped.groups()
        totals = {} if some is None else {"some": int(some)}
        if full is not None:
            totals["full"] = int(full)
        return totals
    return _parse_pressure_lines(text)


# kernel/sched/psi.c, psi_show(): "some" then "full" (either may be absent: a cgroup's cpu has
# no "full" before 5.13, irq.pressure has only "full"), each "%s avg10=%lu.%02lu avg60=%lu.%02lu
# avg300=%lu.%02lu total=%llu\n".
_PSI_LINE = r" avg10=[0-9]+\.[0-9]+ avg60=[0-9]+\.[0-9]+ avg300=[0-9]+\.[0-9]+ total=([0-9]+)\n"
_PSI_FILE = re.compile(f"(?:some{_PSI_LINE})?(?:full{_PSI_LINE})?")


def _parse_pressure_lines(text: str) -> dict[str, int]:
    """parse_pressure_totals line by line: any text, every odd line counted."""
    totals: dict[str, int] = {}
    for line in text.split("\n"):
        kind = line[:4]
        if kind not in ("some", "full") or line[4:5] != " ":
            if line.strip():
                _skip("pressure")
            continue
        at = line.rfind(" total=")
        if at < 0:
            _skip("pressure")
            continue
        raw = line[at + 7 :].split(" ", 1)[0].rstrip()
        if raw.isdigit() and raw.isascii():
            totals[kind] = int(raw)
        else:
            _skip("pressure")
    return totals


# --------------------------------------------------------------------------------------------
# /proc/<pid>/net/dev


@dataclass(frozen=True, slots=True)
class NetDevCounters:
    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_drops: int
    rx_fifo: int
    rx_frame: int
    rx_compressed: int
    rx_multicast: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_drops: int
    tx_fifo: int
    tx_colls: int
    tx_carrier: int
    tx_compressed: int


def parse_net_dev(text: str) -> dict[str, NetDevCounters]:
    """/proc/<pid>/net/dev: {interface: counters} for the network namespace of <pid>.

    The two header lines have no "name:" prefix of the right shape and are skipped, as is
    any line without exactly 16 integer columns.  Interface names cannot contain ':' (the
    kernel refuses them), so the first ':' ends the name even when a wide number touches it.
    """
    interfaces: dict[str, NetDevCounters] = {}
    for line in text.split("\n"):
        name, sep, rest = line.partition(":")
        # The kernel right-aligns the name with ASCII spaces ("%6s:"); a name cannot hold a
        # space, but may hold any other byte the kernel's isspace() lets through (\x1c, \x85,
        # UTF-8 U+2028...), which str.strip() would also take off.
        name = name.strip(" ")
        if not sep or not name or " " in name:
            if "|" not in line and line.strip(" "):  # the two header lines have "|" and no ':'
                _skip("net_dev")
            continue
        raw = rest.split()
        if len(raw) != 16 or not all(f.isdigit() and f.isascii() for f in raw):
            _skip("net_dev")
            continue
        interfaces[name] = NetDevCounters(*map(int, raw))
    return interfaces


# --------------------------------------------------------------------------------------------
# /proc/<pid>/mountinfo


@dataclass(frozen=True, slots=True)
class MountInfo:
    mount_id: int
    parent_id: int
    dev: DevNum
    root: str  # the path inside the filesystem that is mounted here ("/" unless a bind mount)
    mount_point: str  # relative to the process's root
    options: str  # per-mount options (rw,relatime)
    optional: tuple[str, ...]  # shared:N, master:N, ...
    fstype: str
    source: str
    super_options: str


def unescape_mountinfo(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as \\ooo octal."""
    if "\\" not in path:
        return path
    out: list[str] = []
    i = 0
    while i < len(path):
        chunk = path[i + 1 : i + 4]
        if path[i] == "\\" and len(chunk) == 3 and all(c in "01234567" for c in chunk):
            out.append(chr(int(chunk, 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountInfo]:
    """/proc/<pid>/mountinfo, one MountInfo per well-formed line, in file order.

    Shape: "id parent maj:min root mount_point options [optional...] - fstype source super_options".
    """
    mounts: list[MountInfo] = []
    for line in text.split("\n"):
        left, sep, right = line.partition(" - ")
        if not sep:
            if line.strip():
                _skip("mountinfo")
            continue
        fields = left.split(" ")
        tail = right.split(" ")
        if len(fields) < 6 or len(tail) < 2:
            _skip("mountinfo")
            continue
        mount_id, parent_id = _int(fields[0]), _int(fields[1])
        dev = parse_devnum(fields[2])
        if mount_id is None or parent_id is None or dev is None:
            _skip("mountinfo")
            continue
        mounts.append(
            MountInfo(
                mount_id=mount_id,
                parent_id=parent_id,
                dev=dev,
                root=unescape_mountinfo(fields[3]),
                mount_point=unescape_mountinfo(fields[4]),
                options=fields[5],
                optional=tuple(f for f in fields[6:] if f),
                fstype=tail[0],
                source=unescape_mountinfo(tail[1]),
                super_options=tail[2] if len(tail) > 2 else "",
            )
        )
    return mounts


# --------------------------------------------------------------------------------------------
# /sys/dev/block/M:m/uevent and cgroup.procs


def parse_uevent(text: str) -> dict[str, str]:
    """KEY=value lines (MAJOR, MINOR, DEVNAME, DEVTYPE, DISKSEQ, ...)."""
    values: dict[str, str] = {}
    for line in text.split("\n"):
        key, sep, value = line.partition("=")
        key = key.strip()
        if sep and key and " " not in key:
            values[key] = value.strip()
        elif line.strip():
            _skip("uevent")
    return values


def parse_devname(text: str) -> str | None:
    """The DEVNAME of a uevent file ("vda", "nvme0n1p1", "mapper/..." is "dm-0"), or None."""
    name = parse_uevent(text).get("DEVNAME")
    return name or None


def parse_cgroup_procs(text: str) -> list[int]:
    """cgroup.procs: one PID per line; an empty file is a cgroup without processes."""
    pids: list[int] = []
    for line in text.split("\n"):
        pid = _int(line.strip())
        if pid is not None and pid > 0:
            pids.append(pid)
        elif line.strip():
            _skip("cgroup_procs")
    return pids

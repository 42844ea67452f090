"""What this kernel lets BPF programs do, found by loading tiny programs, not from its version.

Distributions backport BPF features and configs differ, so a version number proves little:
each probe loads one program of bpf/probe.bpf.o (and attaches it where attaching is the
question), and the kernel's answer is the result.  Answers are cached for the process: the
kernel does not change under it.  Each answer is None (supported) or one line saying what
this kernel lacks, which `kpod-metrics check` and the log repeat.
"""

from __future__ import annotations

import threading

from kpod.kernel import libbpf
from kpod.kernel.objects import object_path

PROBE_OBJECT = "probe"
_lock = threading.Lock()
_answers: dict[tuple[str, ...], str | None] = {}


def _probe_path(program_dir: str) -> str:
    return object_path(PROBE_OBJECT, program_dir)


def _cached(key: tuple[str, ...], run: object) -> str | None:
    with _lock:
        if key not in _answers:
            _answers[key] = run()  # type: ignore[operator]
        return _answers[key]


def _load_one(program_dir: str, program: str, keep_maps: set[str], target: str = "", attach: bool = False) -> None:
    """Load (and attach) one program of the probe object; raises LibbpfError if refused."""
    with libbpf.BpfObject.open(_probe_path(program_dir)) as obj:
        for name, prog in obj.programs.items():
            prog.set_autoload(name == program)
        for name, bpf_map in obj.maps.items():
            if not name.endswith((".rodata", ".bss", ".data")):
                bpf_map.set_autocreate(name in keep_maps)
        if target:
            obj.programs[program].set_attach_target(target)
        obj.load()
        if attach:
            obj.programs[program].attach()


def task_storage_in_tracing(program_dir: str = "") -> str | None:
    """Can tracing programs use task-local storage (5.13+: a10787e6d58c)?"""

    def run() -> str | None:
        try:
            _load_one(program_dir, "probe_task_storage", {"probe_task_map"})
        except libbpf.LibbpfError as exc:
            return f"kernel refuses task-local storage in tracing programs (5.13+; probe: {exc.strerror})"
        return None

    return _cached(("task_storage", program_dir), run)


def trampoline_attach(function: str, program_dir: str = "") -> str | None:
    """Can a fentry/fexit program attach to `function` (needs a BPF trampoline: x86 since
    5.5, arm64 only since 6.4; some kernels refuse it by policy, e.g. EPERM)?"""

    def run() -> str | None:
        try:
            _load_one(program_dir, "probe_fexit", set(), target=function, attach=True)
        except libbpf.LibbpfError as exc:
            if exc.errno == libbpf.ENOTSUPP:
                why = "no BPF trampoline for kernel functions on this kernel/architecture (arm64 before 6.4)"
            else:
                why = exc.strerror
            return f"fentry/fexit cannot attach to {function} here ({why})"
        return None

    return _cached(("trampoline", function, program_dir), run)


def forget() -> None:
    """Drop the cached answers (tests that fake a kernel)."""
    with _lock:
        _answers.clear()

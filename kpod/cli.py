"""The `kpod-metrics` command: run, validate, check, config --effective.

Exit codes (EXIT_CODES, printed by --help): 0 success; 1 the agent cannot run (the listener port
is taken, check found nothing runnable or discovery failing); 2 a bad config or bad arguments.
Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from kpod import __version__
from kpod.config import AgentConfig, ConfigError, load_config


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


EXIT_CODES = """\
exit status:
  0  success (run: stopped by SIGTERM/SIGINT; validate: the config is valid; check: a receiver can
     run and pod discovery works)
  1  the agent cannot run: the listener's port is taken, an exporter or processor cannot start,
     nothing can run on this node, pod discovery fails (check)
  2  a bad config or bad arguments (one line on stderr naming the file, line and key)
"""


def _environment_help() -> str:
    """The KPOD_* variables, one per key of the `kpod:` section, generated from the settings."""
    from kpod.config.overrides import env_var_name, leaf_paths
    from kpod.settings import KpodSettings

    names = [f"  {env_var_name(path):<44} kpod.{'.'.join(path)}" for path, _ in leaf_paths(KpodSettings)]
    return (
        "configuration: built-in defaults < the --config file < KPOD_* environment variables.\n"
        "In the file, ${env:VAR} and ${env:VAR:-default} are replaced in every string value.\n"
        "KPOD_* variables (lists are comma-separated; durations like 30s or milliseconds):\n" + "\n".join(names) + "\n"
    )


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, told the terminal's width as shutil.get_terminal_size() would tell
    it: argparse asks shutil, and importing shutil (with bz2, lzma and fnmatch: ~0.2 MiB) for a
    help text that `run` never prints would stay in the agent's memory for its whole life."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        super().__init__(prog, indent_increment, max_help_position, _terminal_columns() - 2 if width is None else width)


def _terminal_columns() -> int:
    """COLUMNS, else the width of the terminal on stdout, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


def _parser() -> argparse.ArgumentParser:
    formatter = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="kpod-metrics",
        description="Per-pod kernel metrics agent: eBPF and cgroup receivers -> processors -> Prometheus/OTLP.",
        epilog=EXIT_CODES + "\n" + _environment_help() + "\n`kpod-metrics COMMAND --help` describes each command.",
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"kpod-metrics {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "YAML config file (without it: the built-in defaults; KPOD_* variables apply either way)"

    run = commands.add_parser(
        "run", help="run the agent until SIGTERM/SIGINT", formatter_class=formatter, epilog=EXIT_CODES,
        description="Collect every poll interval and serve /metrics, /healthz, /readyz and /debug/status.",
    )  # fmt: skip
    run.add_argument("--config", metavar="PATH", help=config_help)
    run.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="log lines as text or as one JSON object each (default: text)")  # fmt: skip
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                     help="least severe level logged (default: info)")  # fmt: skip
    run.add_argument("--cycles", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop after N

    validate = commands.add_parser(
        "validate", help="check a config file: exit 0 (valid, warnings on stderr) or 2", formatter_class=formatter,
        epilog=EXIT_CODES, description="Load the config as `run` would, without touching the node.",
    )  # fmt: skip
    validate.add_argument("--config", metavar="PATH", required=True, help="YAML config file to check")

    check = commands.add_parser(
        "check", help="preflight: what can run on this node and why not, and whether pod discovery works",
        formatter_class=formatter, epilog=EXIT_CODES,
        description="Kernel, BTF, cgroup layout, capabilities, tracefs, each receiver's route, then one\n"
        "request to the API server (or the kubelet) with the configured credentials.",
    )  # fmt: skip
    check.add_argument("--config", metavar="PATH", help=config_help)

    config = commands.add_parser(
        "config", help="print the effective config (for bug reports)", formatter_class=formatter,
        epilog=EXIT_CODES, description="The config the agent would run with, as YAML that loads again.",
    )  # fmt: skip
    config.add_argument("--config", metavar="PATH", help=config_help)
    config.add_argument("--effective", action="store_true", required=True,
                        help="defaults filled in, ${env:...} substituted, KPOD_* applied, the profile's "
                        "receivers and the pipeline spelled out; header values redacted")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return _validate(args.config)
    if args.command == "check":
        return _check(args.config)
    if args.command == "config":
        return _effective(args.config)
    return _run(args)


def _load(path: str | None) -> AgentConfig | None:
    try:
        return load_config(path)
    except ConfigError as error:
        print(f"kpod-metrics: config error: {error}", file=sys.stderr)
        return None


def _validate(path: str) -> int:
    config = _load(path)
    if config is None:
        return 2
    receivers = ", ".join(spec.id for spec in config.receivers)
    for warning in config.warnings:
        print(f"kpod-metrics: warning: {warning}", file=sys.stderr)
    print(f"{path}: valid (profile {config.kpod.profile}; receivers: {receivers})")
    return 0


def _effective(path: str | None) -> int:
    from kpod.config.effective import effective_yaml

    config = _load(path)
    if config is None:
        return 2
    for warning in config.warnings:
        print(f"kpod-metrics: warning: {warning}", file=sys.stderr)
    sys.stdout.write(effective_yaml(config))
    return 0


def _run(args: argparse.Namespace) -> int:
    from kpod import allocator

    tuned = allocator.tune()  # before any thread starts: see kpod/allocator.py
    setup_logging(args.log_format, args.log_level)
    if not tuned:
        logging.getLogger("kpod").debug("allocator: not glibc, its defaults stay")
    config = _load(args.config)
    if config is None:
        return 2
    from kpod.agent import Agent, install_signal_handlers

    log = logging.getLogger("kpod")
    try:
        agent = Agent(config)
    except (OSError, ValueError) as error:
        log.error("cannot start: %s", error)
        return 1
    if agent.cgroups.ebpf_unattributable:
        log.warning("cgroups: %s", agent.cgroups.ebpf_unattributable)
    install_signal_handlers(agent)
    for warning in config.warnings:
        log.warning("config: %s", warning)
    log.info(
        "kpod-metrics %s: profile %s, discovery %s, poll every %s, node %s",
        __version__,
        config.kpod.profile,
        config.kpod.discovery.mode,
        config.kpod.poll_interval,
        config.kpod.node_name,
    )
    try:
        agent.run(max_cycles=args.cycles)
    except OSError as error:  # the listener's port is taken, a processor cannot start...
        log.error("cannot start: %s", error)
        return 1
    log.info("stopped")
    return 0


def _check(path: str | None) -> int:
    # `check` reports what the node offers, so it asks the kernel and cgroup packages directly
    # (and only for this command).
    from kpod.agent import build_cgroup_index
    from kpod.cgroup.mounts import parse_mountinfo_cgroups, read_mountinfo
    from kpod.component import Context
    from kpod.kernel.preflight import kernel_facts
    from kpod.selfmetrics import SelfMetrics

    config = _load(path)
    if config is None:
        return 2
    facts = kernel_facts()
    mounts = parse_mountinfo_cgroups(read_mountinfo())
    print(f"kernel:       {facts.kernel} ({facts.machine})")
    print(f"BTF:          {'yes' if facts.btf else 'no (/sys/kernel/btf/vmlinux missing: eBPF receivers cannot run)'}")
    try:
        cgroups = build_cgroup_index(config)
    except (OSError, ValueError) as error:
        cgroups, unusable = None, str(error)
    note = f"; {cgroups.ebpf_unattributable}" if cgroups is not None and cgroups.ebpf_unattributable else ""
    print(f"cgroups:      {mounts.layout} (cgroup2 at {mounts.unified or 'nowhere'}){note}")
    caps = ", ".join(sorted(facts.capabilities)) or "none of the relevant ones"
    print(f"capabilities: {caps}{' (root)' if facts.root else ''}")
    if any(spec.factory.requires_bpf for spec in config.receivers):
        from kpod.kernel.ebpf import syscall_probe  # asks the kernel: a trivial program, a perf event

        print(f"seccomp:      {syscall_probe().summary()}")
    print(f"tracefs:      {facts.tracefs or 'not mounted (tp_btf and raw tracepoints still work)'}")
    print(f"profile:      {config.kpod.profile}; discovery: {config.kpod.discovery.mode}")
    if cgroups is None:
        print(f"cgroup root:  unusable: {unusable}")
        return 1
    runnable = 0
    print("receivers:")
    for spec in config.receivers:
        context = Context(id=spec.id, settings=config.kpod, cgroups=cgroups, self_metrics=SelfMetrics())
        try:
            receiver = spec.factory.create(context, spec.config)
            reason = receiver.preflight()  # type: ignore[attr-defined]
            route = receiver.route()  # type: ignore[attr-defined]
        except Exception as error:
            reason, route = f"{type(error).__name__}: {error}", ""
        if reason:
            print(f"  {spec.id:<14} cannot run: {reason}")
        else:
            runnable += 1
            print(f"  {spec.id:<14} ok: {route}")
    if runnable == 0:
        print("nothing can run on this node")
        return 1
    return 0 if _check_components(config) else 1


def _check_components(config: AgentConfig) -> bool:
    """The components' own findings (k8sattributes: pod discovery), one line each; False if any failed."""
    ok = True
    for spec in [*config.receivers, *config.processors, *config.exporters]:
        if spec.factory.check is None:
            continue
        for finding in spec.factory.check(config.kpod, spec.config):
            # Aligned with the lines above; a space even after an id as long as the column.
            print(f"{spec.id + ':':<13} {finding.text}")
            ok = ok and finding.ok
    return ok


if __name__ == "__main__":
    sys.exit(main())

"""The `kpod-metrics` command: run, validate, check.

Exit codes: 0 success; 1 the agent cannot run (check found nothing runnable, the listener port
is taken); 2 a bad config or bad arguments.  Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kpod-metrics", description="Per-pod kernel metrics agent.")
    parser.add_argument("--version", action="version", version=f"kpod-metrics {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the agent")
    run.add_argument("--config", help="YAML config file (default: the built-in defaults)")
    run.add_argument("--log-format", choices=("text", "json"), default="text")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    run.add_argument("--cycles", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop after N
    validate = commands.add_parser("validate", help="check a config file and exit 0 (valid) or 2")
    validate.add_argument("--config", required=True)
    check = commands.add_parser("check", help="preflight: what can run on this node, and why not")
    check.add_argument("--config")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return _validate(args.config)
    if args.command == "check":
        return _check(args.config)
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


def _run(args: argparse.Namespace) -> int:
    setup_logging(args.log_format, args.log_level)
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
    print(f"cgroups:      {mounts.layout} (cgroup2 at {mounts.unified or 'nowhere'})")
    caps = ", ".join(sorted(facts.capabilities)) or "none of the relevant ones"
    print(f"capabilities: {caps}{' (root)' if facts.root else ''}")
    if any(spec.factory.requires_bpf for spec in config.receivers):
        from kpod.kernel.ebpf import syscall_probe  # asks the kernel: a trivial program, a perf event

        print(f"seccomp:      {syscall_probe().summary()}")
    print(f"tracefs:      {facts.tracefs or 'not mounted (tp_btf and raw tracepoints still work)'}")
    print(f"profile:      {config.kpod.profile}; discovery: {config.kpod.discovery.mode}")
    try:
        cgroups = build_cgroup_index(config)
    except (OSError, ValueError) as error:
        print(f"cgroup root:  unusable: {error}")
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
    return 0 if _check_discovery(config) else 1


def _check_discovery(config: AgentConfig) -> bool:
    """One line per finding about pod discovery (API server or kubelet); False if any failed."""
    from kpod.processors.k8sattributes.check import check_discovery
    from kpod.processors.k8sattributes.config import K8sAttributesConfig

    spec = next((p for p in config.processors if p.factory.type == "k8sattributes"), None)
    if spec is None:
        print("discovery:    no k8sattributes processor in the pipeline: series carry no pod labels")
        return True
    findings = check_discovery(config.kpod, spec.config if isinstance(spec.config, K8sAttributesConfig) else
                               K8sAttributesConfig())  # fmt: skip
    for finding in findings:
        print(f"discovery:    {finding.text}")
    return all(finding.ok for finding in findings)


if __name__ == "__main__":
    sys.exit(main())

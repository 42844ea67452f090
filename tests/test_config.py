"""The config file: shape, defaults, substitution, overrides, and every bad input."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from kpod.config import ConfigError, load_config
from kpod.config.env import substitute_env
from kpod.units import Duration

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config.example.yaml"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def ids(specs: list) -> list[str]:
    return [spec.id for spec in specs]


CUSTOM = """\
kpod:
  profile: custom
receivers:
  cgroup_cpu: {}
exporters:
  prometheus: {}
service:
  pipelines:
    metrics:
      receivers: [cgroup_cpu]
      exporters: [prometheus]
"""


def test_example_equals_builtin_defaults(clean_env: dict[str, str]) -> None:
    from_file = load_config(str(EXAMPLE), environ=clean_env)
    builtin = load_config(None, environ=clean_env)
    assert dataclasses.asdict(from_file.kpod) == dataclasses.asdict(builtin.kpod)
    assert ids(from_file.receivers) == ids(builtin.receivers)
    assert ids(from_file.processors) == ids(builtin.processors) == ["k8sattributes"]
    assert ids(from_file.exporters) == ids(builtin.exporters) == ["prometheus"]
    assert [s.config for s in from_file.exporters] == [s.config for s in builtin.exporters]


def test_example_values(clean_env: dict[str, str]) -> None:
    config = load_config(str(EXAMPLE), environ=clean_env)
    assert config.kpod.profile == "standard"
    assert config.kpod.poll_interval == Duration(30.0)
    assert config.kpod.discovery.mode == "local"
    assert config.kpod.filter.exclude_namespaces == ["kube-system", "kube-public"]
    assert config.kpod.syscall.tracked_syscalls == []  # the architecture's default set
    assert config.kpod.bpf.map_max_entries == 10240
    assert config.exporters[0].config.endpoint == "0.0.0.0:9090"


def test_discovery_defaults_to_informer_inside_a_pod(clean_env: dict[str, str]) -> None:
    env = {**clean_env, "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert load_config(None, environ=env).kpod.discovery.mode == "informer"
    assert load_config(None, environ=clean_env).kpod.discovery.mode == "local"


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ("minimal", ["cpu_sched", "memory", "bpf_maps", "disk", "cgroup_cpu", "cgroup_memory"]),
        (
            "standard",
            ["cpu_sched", "memory", "net_tcp", "bpf_maps", "disk", "cgroup_cpu", "cgroup_memory",
             "net_iface", "filesystem", "pressure"],
        ),
        (
            "comprehensive",
            ["cpu_sched", "memory", "net_tcp", "bpf_maps", "disk", "cgroup_cpu", "cgroup_memory",
             "net_iface", "filesystem", "pressure", "syscall"],
        ),
    ],
)
def test_profiles_expand_to_the_spec_table(clean_env: dict[str, str], profile: str, expected: list[str]) -> None:
    config = load_config(None, environ={**clean_env, "KPOD_PROFILE": profile})
    assert ids(config.receivers) == expected
    memory = next(s for s in config.receivers if s.id == "memory")
    # The minimal profile has OOM kills but not major page faults.
    assert memory.config.major_faults is (profile != "minimal")


def test_bpf_disabled_drops_ebpf_receivers(clean_env: dict[str, str]) -> None:
    config = load_config(None, environ={**clean_env, "KPOD_BPF_ENABLED": "false"})
    assert not {"cpu_sched", "memory", "net_tcp", "bpf_maps"} & set(ids(config.receivers))
    assert "disk" in ids(config.receivers)


def test_custom_profile_runs_only_listed(tmp_path: Path, clean_env: dict[str, str]) -> None:
    config = load_config(write(tmp_path, CUSTOM), environ=clean_env)
    assert ids(config.receivers) == ["cgroup_cpu"]


def test_user_settings_override_profile_settings(tmp_path: Path, clean_env: dict[str, str]) -> None:
    text = "kpod: {profile: minimal}\nreceivers:\n  memory: {major_faults: true}\n"
    config = load_config(write(tmp_path, text), environ=clean_env)
    assert next(s for s in config.receivers if s.id == "memory").config.major_faults is True


def test_per_receiver_interval(tmp_path: Path, clean_env: dict[str, str]) -> None:
    text = CUSTOM.replace("cgroup_cpu: {}", "cgroup_cpu: {interval: 2m}")
    config = load_config(write(tmp_path, text), environ=clean_env)
    assert config.receivers[0].interval == Duration(120.0)


def test_env_substitution(tmp_path: Path, clean_env: dict[str, str]) -> None:
    text = (
        "kpod:\n  node_name: ${env:MY_NODE}\n  poll_interval: ${env:POLL_MS}\n"
        "  cgroup: {proc_root: '${env:HOST:-/host}/proc'}\n"
    )
    env = {**clean_env, "MY_NODE": "node-7", "POLL_MS": "1500"}
    config = load_config(write(tmp_path, text), environ=env)
    assert config.kpod.node_name == "node-7"
    assert config.kpod.poll_interval == Duration(1.5)  # an integer after substitution: milliseconds
    assert config.kpod.cgroup.proc_root == "/host/proc"
    assert substitute_env("${env:NOPE:-fallback}", {}) == "fallback"
    assert substitute_env("a-${env:NOPE}-b", {}) == "a--b"


def test_kpod_env_overrides_win_over_the_file(tmp_path: Path, clean_env: dict[str, str]) -> None:
    text = "kpod:\n  profile: minimal\n  poll_interval: 10s\n"
    env = {
        **clean_env,
        "KPOD_PROFILE": "comprehensive",
        "KPOD_POLL_INTERVAL": "5000",
        "KPOD_DISCOVERY_MODE": "kubelet",
        "KPOD_FILTER_EXCLUDE_NAMESPACES": "a, b,c",
        "KPOD_DISCOVERY_KUBELET_POLL_INTERVAL": "15s",
        "KPOD_SYSCALL_TRACKED_SYSCALLS": "read,write",
    }
    config = load_config(write(tmp_path, text), environ=env)
    assert config.kpod.profile == "comprehensive"
    assert config.kpod.poll_interval == Duration(5.0)
    assert config.kpod.discovery.mode == "kubelet"
    assert config.kpod.filter.exclude_namespaces == ["a", "b", "c"]
    assert config.kpod.discovery.kubelet.poll_interval == Duration(15.0)
    assert config.kpod.syscall.tracked_syscalls == ["read", "write"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kpod:\n  profile: [unclosed\n", ": YAML syntax error"),
        ("kpod:\n  profil: standard\n", ":2: kpod.profil: unknown key"),
        ("kpod:\n  bpf:\n    enabled: yes please\n", ":3: kpod.bpf.enabled: expected true or false"),
        ("kpod:\n  poll_interval: soon\n", ":2: kpod.poll_interval: expected a duration"),
        ("kpod:\n  poll_interval: 9999h\n", ":2: kpod.poll_interval: duration '9999h' is out of range"),
        ("kpod:\n  poll_interval: -5\n", ":2: kpod.poll_interval: duration -5 is out of range"),
        ("kpod:\n  profile: everything\n", "kpod.profile: must be one of minimal, standard"),
        ("kpod:\n  discovery: {mode: magic}\n", "kpod.discovery.mode: must be one of informer, kubelet, local"),
        ("kpod:\n  syscall: {tracked_syscalls: [read, frobnicate]}\n", "unknown syscall name(s)"),
        ("kpod:\n  bpf: {map_max_entries: -1}\n", ":2: kpod.bpf.map_max_entries: must be"),
        ("kpod:\n  filter: {namespaces: prod}\n", ":2: kpod.filter.namespaces: expected a list"),
        ("receivers:\n  nosuch: {}\n", ":2: receivers.nosuch: unknown receiver type 'nosuch'"),
        ("exporters:\n  prometheus: {endpoint: 9090}\n", ":2: exporters.prometheus.endpoint: expected a string"),
        ("exporters:\n  prometheus: {endpoint: nowhere}\n", ":2: exporters.prometheus.endpoint: expected host:port"),
        (
            "exporters:\n  prometheus:\n    endpoint: ${env:LISTEN}\n",
            ":3: exporters.prometheus.endpoint: expected host:port, got '' (environment variable LISTEN is not set)",
        ),
        (
            "kpod:\n  poll_interval: ${env:POLL}\n",
            ":2: kpod.poll_interval: expected a duration like 30s, 500ms, 2m or 1h, got ''"
            " (environment variable POLL is not set)",
        ),
        (
            "exporters:\n  otlp:\n    endpoint: collector:4317\n    tls: {cert_file: a.pem}\n",
            ":4: exporters.otlp.tls: tls.cert_file and tls.key_file go together",
        ),
        ("exporters:\n  prometheus: {colour: red}\n", ":2: exporters.prometheus.colour: unknown key"),
        ("exporters:\n  prometheus: {histograms: all}\n", "prometheus.histograms: must be one of both, native"),
        (
            "exporters:\n  prometheus: {}\nservice:\n  pipelines:\n    metrics:\n      exporters: [otlp]\n",
            ":6: service.pipelines.metrics.exporters: exporter 'otlp' is not declared",
        ),
        (
            "kpod: {profile: custom}\nservice:\n  pipelines:\n    metrics:\n      receivers: [cgroup_cpu]\n",
            ":5: service.pipelines.metrics.receivers: receiver 'cgroup_cpu' is not declared",
        ),
        ("kpod:\n  profile: minimal\n  profile: standard\n", ":3: duplicate key 'profile'"),
        ("metrics: {}\n", ":1: metrics: unknown top-level key"),
        ("kpod:\n  filter: {label_selector: 'app in (a'}\n", "kpod.filter.label_selector:"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("kpod:\n  syscall: {tracked_syscalls: [" + ", ".join(["read"] * 10000) + "]}\n", "at most 1000 items"),
    ],
)
def test_bad_config_is_one_line_naming_file_line_and_key(
    tmp_path: Path, clean_env: dict[str, str], text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=clean_env)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(path), message
    assert expected in message, message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The offending key's own line, not the line of `kpod:` (checks that need more than the
        # key's type run after building, and used to name line 1).
        ("# label filter\nkpod:\n  poll_interval: 30s\n  filter:\n    label_selector: 'app in (a'\n",
         ":5: kpod.filter.label_selector: "),
        ("kpod:\n  profile: standard\n  discovery:\n    failure_window: 1m\n    mode: magic\n",
         ":5: kpod.discovery.mode: must be one of informer, kubelet, local, got 'magic'"),
        ("\nkpod:\n  discovery: {mode: magic}\n", ":3: kpod.discovery.mode: must be one of"),
        ("kpod:\n  node_name: n\n  profile: everything\n", ":3: kpod.profile: must be one of"),
        ("kpod:\n  node_name: n\n  poll_interval: 10ms\n", ":3: kpod.poll_interval: must be at least 100ms"),
        ("kpod:\n  bpf:\n    enabled: true\n    map_max_entries: 0\n",
         ":4: kpod.bpf.map_max_entries: must be between 1 and 1048576"),
        ("kpod:\n  syscall:\n    tracked_syscalls:\n      - read\n      - frobnicate\n",
         ":3: kpod.syscall.tracked_syscalls: unknown syscall name(s)"),
    ],
)  # fmt: skip
def test_settings_errors_name_the_line_of_their_key(
    tmp_path: Path, clean_env: dict[str, str], text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=clean_env)
    assert str(caught.value).startswith(path + expected), str(caught.value)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("KPOD_DISCOVERY_MODE", "magic", "kpod.discovery.mode: must be one of"),
        ("KPOD_FILTER_LABEL_SELECTOR", "app in (a", "kpod.filter.label_selector: "),
        ("KPOD_SYSCALL_TRACKED_SYSCALLS", "read,frobnicate", "kpod.syscall.tracked_syscalls: unknown syscall"),
    ],
)
def test_settings_errors_from_the_environment_name_the_variable(
    tmp_path: Path, clean_env: dict[str, str], variable: str, value: str, expected: str
) -> None:
    path = write(tmp_path, "kpod:\n  node_name: n\n  discovery: {mode: local}\n  filter: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={**clean_env, variable: value})
    assert str(caught.value).startswith(f"{variable} (environment): {expected}"), str(caught.value)


def test_bad_environment_override_names_the_variable(clean_env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"^KPOD_POLL_INTERVAL \(environment\): kpod.poll_interval: "):
        load_config(None, environ={**clean_env, "KPOD_POLL_INTERVAL": "often"})


def test_missing_file(tmp_path: Path, clean_env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read: No such file"):
        load_config(str(tmp_path / "nope.yaml"), environ=clean_env)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kpod.cli", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_cli_validate_exit_codes(tmp_path: Path, clean_env: dict[str, str]) -> None:
    good = run_cli("validate", "--config", str(EXAMPLE), env=clean_env)
    assert good.returncode == 0, good.stderr
    bad = run_cli("validate", "--config", write(tmp_path, "kpod:\n  poll_interval: soon\n"), env=clean_env)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in bad.stderr
    assert "config.yaml:2: kpod.poll_interval" in lines[0]


def test_cli_run_with_bad_config_exits_2_without_traceback(tmp_path: Path, clean_env: dict[str, str]) -> None:
    result = run_cli("run", "--config", write(tmp_path, "kpod: [1, 2\n"), env=clean_env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "YAML syntax error" in result.stderr


def test_cli_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("kpod-metrics ")


def test_declared_components_no_pipeline_uses_are_warned_about(tmp_path: Path, clean_env: dict[str, str]) -> None:
    """Valid, but configured for nothing: an exporter, a processor and a receiver that no
    pipeline (nor the profile) names each get a one-line warning with its line; `validate`
    prints them and still exits 0."""
    path = write(
        tmp_path,
        "kpod: {profile: minimal}\n"
        "receivers:\n  syscall: {}\n"
        "processors:\n  filter/x: {exclude: {interface: [lo]}}\n"
        "exporters:\n  prometheus: {}\n  otlp: {endpoint: 'collector:4317'}\n"
        "service:\n  pipelines:\n    metrics:\n      exporters: [prometheus]\n",
    )
    config = load_config(path, environ=clean_env)
    assert [e.id for e in config.exporters] == ["prometheus"]
    assert config.warnings == [
        f"{path}:3: receivers.syscall: declared but not in profile minimal nor in service.pipelines.metrics.receivers:"
        " it will not run",
        f"{path}:5: processors.filter/x: declared but not in service.pipelines.metrics.processors: it will not run",
        f"{path}:8: exporters.otlp: declared but not in service.pipelines.metrics.exporters: it will not run",
    ]
    result = subprocess.run([sys.executable, "-m", "kpod.cli", "validate", "--config", path], capture_output=True,
                            text=True, timeout=60, env=clean_env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"kpod-metrics: warning: {w}" for w in config.warnings]
    # Everything used: no warning.
    used = write(tmp_path, "exporters:\n  prometheus: {}\n")
    assert load_config(used, environ=clean_env).warnings == []


def test_effective_config_is_what_runs_and_loads_again(tmp_path: Path, clean_env: dict[str, str]) -> None:
    """`kpod-metrics config --effective`: defaults, ${env:...} and KPOD_* applied, the profile's
    receivers and the pipeline spelled out; it loads back into the same config; OTLP header
    values (credentials) are not printed."""
    import yaml

    from kpod.config.effective import REDACTED, effective_document

    path = write(
        tmp_path,
        "kpod:\n  profile: minimal\n  node_name: ${env:MY_NODE}\n"
        "exporters:\n  prometheus: {endpoint: '127.0.0.1:9999'}\n"
        "  otlp: {endpoint: 'collector:4317', headers: {authorization: 'Bearer s3cret'}}\n"
        "service:\n  pipelines:\n    metrics:\n      exporters: [prometheus, otlp]\n",
    )
    env = {**clean_env, "MY_NODE": "node-7", "KPOD_POLL_INTERVAL": "15s"}
    config = load_config(path, environ=env)
    document = effective_document(config)
    assert document["kpod"]["node_name"] == "node-7" and document["kpod"]["poll_interval"] == "15s"
    assert list(document["receivers"]) == [r.id for r in config.receivers] != []
    assert document["service"]["pipelines"]["metrics"]["exporters"] == ["prometheus", "otlp"]
    assert document["exporters"]["otlp"]["headers"] == {"authorization": REDACTED}
    result = subprocess.run([sys.executable, "-m", "kpod.cli", "config", "--effective", "--config", path],
                            capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout
    printed = yaml.safe_load(result.stdout)
    assert printed == document
    # Loaded again (without the environment that made it): the same config.
    again = write(tmp_path, result.stdout)
    reloaded = effective_document(load_config(again, environ=clean_env))
    assert reloaded == document


def test_help_describes_every_option_the_exit_codes_and_the_overrides() -> None:
    import argparse

    from kpod.cli import EXIT_CODES, _parser
    from kpod.config.overrides import env_var_name, leaf_paths
    from kpod.settings import KpodSettings

    parser = _parser()
    top = parser.format_help()
    assert EXIT_CODES.splitlines()[1].strip() in top
    for path, _ in leaf_paths(KpodSettings):
        assert f"{env_var_name(path)} " in top and f"kpod.{'.'.join(path)}" in top
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == {"run", "validate", "check", "config"}
    for name, sub in commands.choices.items():
        assert "exit status:" in sub.format_help(), name
        for action in sub._actions:
            if action.dest in ("help", "cycles"):  # --cycles: for tests, hidden on purpose
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)

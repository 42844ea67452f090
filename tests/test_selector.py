"""Label selector syntax and the pod filter semantics (every operator, include/exclude)."""

from __future__ import annotations

import pytest
from kpod.processors.k8sattributes.selector import (
    EQUALS,
    EXISTS,
    IN,
    NOT_EQUALS,
    NOT_EXISTS,
    NOT_IN,
    PodFilter,
    Requirement,
    include_label_names,
    parse_selector,
    prometheus_label_name,
)

WEB = {"app": "web", "tier": "frontend", "env": "prod"}
DB = {"app": "db", "tier": "backend"}
BARE: dict[str, str] = {}


@pytest.mark.parametrize(
    ("text", "requirements"),
    [
        ("", ()),
        ("   ", ()),
        ("app=web", (Requirement("app", EQUALS, frozenset({"web"})),)),
        ("app==web", (Requirement("app", EQUALS, frozenset({"web"})),)),
        ("app != web", (Requirement("app", NOT_EQUALS, frozenset({"web"})),)),
        ("app in (web, db)", (Requirement("app", IN, frozenset({"web", "db"})),)),
        ("app notin (web)", (Requirement("app", NOT_IN, frozenset({"web"})),)),
        ("app", (Requirement("app", EXISTS),)),
        ("!app", (Requirement("app", NOT_EXISTS),)),
        ("app=", (Requirement("app", EQUALS, frozenset({""})),)),
        (
            "app.kubernetes.io/name=web,!canary, env in (prod,stage),tier",
            (
                Requirement("app.kubernetes.io/name", EQUALS, frozenset({"web"})),
                Requirement("canary", NOT_EXISTS),
                Requirement("env", IN, frozenset({"prod", "stage"})),
                Requirement("tier", EXISTS),
            ),
        ),
    ],
)
def test_parse(text: str, requirements: tuple[Requirement, ...]) -> None:
    assert parse_selector(text).requirements == requirements


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("app=web,", "expected a requirement after ','"),
        ("app in web", 'expected "(" after in/notin'),
        ("app in (web", 'missing ")"'),
        ("app in ()", "at least one value"),
        ("app in (web,)", "expected a value after ','"),
        ("app in (a b)", "expected ',' or ')'"),
        ("app = = web", "expected a value"),
        ("=web", "expected a label key"),
        ("app web", "expected =, ==, !=, in, notin"),
        ("app=web db", "expected ',' or the end"),
        ("-app=web", "is not a valid label key"),
        ("app=we/b", "is not a valid label value"),
        ("app=" + "v" * 64, "is not a valid label value"),
        ("!", "expected a label key"),
        ("app=(web)", "expected a value"),
    ],
)
def test_invalid_selectors_raise_one_line_value_error(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_selector(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value) and repr(text) in str(caught.value)


@pytest.mark.parametrize(
    ("text", "web", "db", "bare"),
    [
        ("", True, True, True),
        ("app=web", True, False, False),
        ("app==db", False, True, False),
        # != and notin also select pods that do not have the label at all (API server semantics).
        ("app!=web", False, True, True),
        ("app in (web,cache)", True, False, False),
        ("app notin (web,cache)", False, True, True),
        ("env", True, False, False),
        ("!env", False, True, True),
        ("tier=frontend,env=prod", True, False, False),
        ("tier,!env", False, True, False),
        ("app in (web,db),tier!=backend", True, False, False),
        # A value is matched against the label's value, never its key (reference pitfall 11).
        ("app=app", False, False, False),
        ("web", False, False, False),
        ("app notin (app)", True, True, True),
    ],
)
def test_matches(text: str, web: bool, db: bool, bare: bool) -> None:
    selector = parse_selector(text)
    assert (selector.matches(WEB), selector.matches(DB), selector.matches(BARE)) == (web, db, bare)


def test_filter_namespaces_include_exclude_and_selector() -> None:
    default = PodFilter.build([], ["kube-system", "kube-public"], "")
    assert default.allows("default", BARE)
    assert not default.allows("kube-system", WEB)

    only = PodFilter.build(["team-a", "team-b"], ["team-b"], "")
    assert only.allows("team-a", BARE)
    assert not only.allows("team-b", BARE)  # excluded wins over included
    assert not only.allows("default", BARE)

    both = PodFilter.build(["team-a"], [], "app=web")
    assert both.allows("team-a", WEB)
    assert not both.allows("team-a", DB)
    assert not both.allows("default", WEB)


def test_filter_rejects_invalid_selector() -> None:
    with pytest.raises(ValueError, match="invalid label selector"):
        PodFilter.build([], [], "app in")


@pytest.mark.parametrize(
    ("label", "name"),
    [
        ("app", "label_app"),
        ("app.kubernetes.io/name", "label_app_kubernetes_io_name"),
        ("team-name", "label_team_name"),
        ("Tier9", "label_Tier9"),
    ],
)
def test_prometheus_label_name(label: str, name: str) -> None:
    assert prometheus_label_name(label) == name


def test_include_label_names() -> None:
    assert include_label_names(["app", "x/y"]) == {"app": "label_app", "x/y": "label_x_y"}
    with pytest.raises(ValueError, match="both become"):
        include_label_names(["x/y", "x.y"])
    with pytest.raises(ValueError, match="empty"):
        include_label_names([""])

"""A small PromQL evaluator for the instant-vector subset our budget alerts use, run over the
samples of one real scrape:

    expr     := operand [ cmp [ "on" "(" labels ")" ] operand ]
    operand  := agg "by" "(" labels ")" "(" selector ")" | selector
    selector := metric [ "{" label ("=" | "!=" | "=~") "value" , ... "}" ]

with agg one of sum, max, min and cmp one of >, >=, <, <=, ==, != (filtering, as without `bool`).
One-to-one matching on the `on` labels, as Prometheus does; anything else is refused, so a rule
this cannot read fails the test instead of passing it.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable

from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]
Vector = dict[Labels, float]

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt,
}
_AGGREGATE: dict[str, Callable[[Iterable[float]], float]] = {"sum": sum, "max": max, "min": min}
_SELECTOR = re.compile(r"^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{([^}]*)\})?\s*$")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')
_AGG = re.compile(r"^\s*(sum|max|min)\s+by\s*\(([^)]*)\)\s*\((.*)\)\s*$", re.DOTALL)
_BINARY = re.compile(r"^(.*?)\s(>=|<=|==|!=|>|<)\s*(?:on\s*\(([^)]*)\))?(.*)$", re.DOTALL)


def scrape_samples(text: str) -> list[tuple[str, Labels, float]]:
    return [(s.name, frozenset(s.labels.items()), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def evaluate(expr: str, samples: list[tuple[str, Labels, float]]) -> Vector:
    """The instant vector `expr` gives over `samples` (label sets without the metric name)."""
    binary = _BINARY.match(expr.strip())
    if binary is None:
        return _operand(expr, samples)
    left_text, op, on_text, right_text = binary.groups()
    left, right = _operand(left_text, samples), _operand(right_text, samples)
    on = _names(on_text) if on_text is not None else None

    def key(labels: Labels) -> Labels:
        return labels if on is None else frozenset((k, v) for k, v in labels if k in on)

    by_key: dict[Labels, float] = {}
    for labels, value in right.items():
        if key(labels) in by_key:
            raise ValueError(f"many-to-one match on the right of {expr!r}: not supported")
        by_key[key(labels)] = value
    return {labels: value for labels, value in left.items()
            if key(labels) in by_key and _COMPARE[op](value, by_key[key(labels)])}


def _operand(text: str, samples: list[tuple[str, Labels, float]]) -> Vector:
    aggregate = _AGG.match(text)
    if aggregate is None:
        return _select(text, samples)
    function, by_text, inner = aggregate.groups()
    by = _names(by_text)
    groups: dict[Labels, list[float]] = {}
    for labels, value in _select(inner, samples).items():
        groups.setdefault(frozenset((k, v) for k, v in labels if k in by), []).append(value)
    return {labels: _AGGREGATE[function](values) for labels, values in groups.items()}


def _select(text: str, samples: list[tuple[str, Labels, float]]) -> Vector:
    match = _SELECTOR.match(text)
    if match is None:
        raise ValueError(f"not a selector this evaluator reads: {text!r}")
    name, matcher_text = match.groups()
    matchers = [m.groups() for m in _MATCHER.finditer(matcher_text or "")]

    def wanted(labels: Labels) -> bool:
        found = dict(labels)
        for label, kind, value in matchers:
            actual = found.get(label, "")
            ok = {"=": actual == value, "!=": actual != value, "=~": re.fullmatch(value, actual) is not None}[kind]
            if not ok:
                return False
        return True

    return {labels: value for sample_name, labels, value in samples if sample_name == name and wanted(labels)}


def _names(text: str) -> set[str]:
    return {part.strip() for part in text.split(",") if part.strip()}

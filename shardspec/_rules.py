"""Group rules: which leaves share one flat buffer (the unit of gather and reduce).

Two forms, both resolved once at plan time, never inside a compiled step:

* an **ordered list** of regexes (or ``(regex, name)`` pairs): the first rule that matches a
  leaf path wins, and the group is named by the matched text (``r"blocks\\.(\\d+)\\."`` puts
  ``blocks.3.attn.weight`` into group ``blocks.3``) or by ``name``, where ``\\1``... refer to the
  regex's capture groups;
* a **dict** ``{name: regex}``: unordered, so the rules must be disjoint; a leaf matched by two
  of them is a duplicate assignment and an error.

Leaves that no rule matches go to the group named by ``rest`` (``"rest"`` by default), or are an
error when ``rest=None``. A rule that matches no leaf at all is an error too: it is almost always a
typo, and silently training without the intended grouping is the expensive way to find out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["GroupRule", "assign_groups", "first_match"]


@dataclass(frozen=True)
class GroupRule:
    """One group rule: leaves whose path matches ``pattern`` (``re.search``) join a group.

    ``name`` is a template expanded with the match (``r"block\\1"``); ``None`` names the group by
    the matched text with trailing dots stripped.
    """

    pattern: str
    name: str | None = None

    def compiled(self) -> re.Pattern[str]:
        try:
            return re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"group rule {self.pattern!r} is not a valid regex: {e}") from None

    def group_of(self, match: re.Match[str]) -> str:
        if self.name is None:
            return match.group(0).strip(".") or self.pattern
        return match.expand(self.name)


RuleTable = Sequence[str | tuple[str, str] | GroupRule] | Mapping[str, str]


def _normalise(rules: RuleTable | None) -> tuple[list[GroupRule], bool]:
    """Return the rules and whether they must be disjoint (dict form)."""
    if rules is None:
        return [], False
    if isinstance(rules, Mapping):
        return [GroupRule(pattern, name) for name, pattern in rules.items()], True
    if isinstance(rules, str):
        raise ValueError(f"group rules must be a list or dict of regexes, got the string {rules!r}")
    out = []
    for r in rules:
        if isinstance(r, GroupRule):
            out.append(r)
        elif isinstance(r, str):
            out.append(GroupRule(r))
        elif isinstance(r, tuple) and len(r) == 2:
            out.append(GroupRule(r[0], r[1]))
        else:
            raise ValueError(f"group rule {r!r} is neither a regex nor a (regex, name) pair")
    return out, False


def assign_groups(
    paths: Iterable[str], rules: RuleTable | None, *, rest: str | None = "rest"
) -> dict[str, list[str]]:
    """Assign every leaf path to exactly one group.

    Args:
        paths: leaf paths in tree order.
        rules: an ordered list (first match wins) or a dict ``{name: regex}`` (must be disjoint).
        rest: the group for unmatched leaves, or ``None`` to make an unmatched leaf an error.

    Returns:
        ``{group: [paths]}``, groups ordered by their first leaf, leaves in tree order.

    Raises:
        ValueError: naming the leaf left unassigned, the leaf assigned twice (dict form), or the
            rule that matches nothing.

    Example:
        >>> assign_groups(["wte", "blocks.0.w", "blocks.1.w"], [r"blocks\\.(\\d+)\\."])
        {'rest': ['wte'], 'blocks.0': ['blocks.0.w'], 'blocks.1': ['blocks.1.w']}
    """
    table, disjoint = _normalise(rules)
    compiled = [(r, r.compiled()) for r in table]
    used = [False] * len(table)
    groups: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for path in paths:
        chosen: str | None = None
        for i, (rule, rx) in enumerate(compiled):
            m = rx.search(path)
            if m is None:
                continue
            name = rule.group_of(m)
            used[i] = True
            if chosen is None:
                chosen = name
                if not disjoint:
                    break
            elif name != chosen:
                raise ValueError(
                    f"leaf {path!r} is assigned twice: to group {chosen!r} and to group {name!r} "
                    f"(rule {rule.pattern!r}); dict-form rules must be disjoint - use an ordered "
                    "list if the first match should win"
                )
        if chosen is None:
            if rest is None:
                raise ValueError(f"leaf {path!r} is matched by no group rule and rest=None")
            chosen = rest
        if path in owner:
            raise ValueError(f"leaf path {path!r} appears twice in the tree")
        owner[path] = chosen
        groups.setdefault(chosen, []).append(path)
    for (rule, _), hit in zip(compiled, used):
        if not hit:
            raise ValueError(
                f"group rule {rule.pattern!r} matches no leaf path (none that an earlier rule "
                "has not already claimed)"
            )
    return groups


def first_match(paths: Iterable[str], patterns: Sequence[str], *, what: str = "rule") -> dict[str, int]:
    """``{path: index of the first pattern that matches it}`` (``re.search``); unmatched paths
    are left out.

    Raises:
        ValueError: a pattern is not a regex, or matches no path (none that an earlier pattern
            has not already claimed), naming it.

    Example:
        >>> first_match(["h.0.q", "h.0.o"], [r"\\.q$", r"\\.(q|o)$"])
        {'h.0.q': 0, 'h.0.o': 1}
    """
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{what} {p!r} is not a valid regex: {e}") from None
    out: dict[str, int] = {}
    for path in paths:
        for i, rx in enumerate(compiled):
            if rx.search(path):
                out[path] = i
                break
    unused = sorted(set(range(len(compiled))) - set(out.values()))
    if unused:
        raise ValueError(f"{what} {patterns[unused[0]]!r} matches nothing (no path that an earlier {what} has not "
                         "already claimed)")
    return out

"""`treadle explain`: why an execution runs where it runs (or why it does not run yet)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import typer

from treadle.cli.output import print_json
from treadle.cli.state import client_from

__all__ = ["explain", "explanation_lines"]


def explain(
    ctx: typer.Context,
    execution_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show where an execution was placed and why: the strategy, each criterion's score and
    weight, the runners-up, and why other nodes were ruled out."""
    answer = client_from(ctx).placement(execution_id)
    if as_json:
        print_json(answer)
        return
    for line in explanation_lines(answer):
        typer.echo(line)


def explanation_lines(answer: Mapping[str, Any]) -> list[str]:
    lines = [f"execution {answer.get('execution_id')}: {answer.get('state')}"]
    placement = answer.get("placement")
    if not isinstance(placement, Mapping):
        reason = answer.get("pending_reason") or "not placed yet"
        lines.append(f"  not placed: {reason}")
        return lines
    names = answer.get("node_names") or {}

    def node(node_id: Any) -> str:
        name = names.get(node_id)
        return f"{name} [{node_id}]" if name else str(node_id)

    lines.append(
        f"  on node {node(placement.get('node_id'))} ({placement.get('provider')}, "
        f"{placement.get('domain') or 'no zone'}), tier {answer.get('isolation')}, "
        f"attempt {answer.get('attempt')}"
    )
    lines.append(
        f"  strategy {placement.get('strategy')}: score {_num(placement.get('score'))}, "
        f"cost {_num(placement.get('cost_per_hour'), 4)}/h for its share"
    )
    weights = placement.get("weights") or {}
    breakdown = placement.get("breakdown") or {}
    if breakdown:
        lines.append("  criterion        value  weight")
        for name in sorted(breakdown, key=lambda n: (-float(weights.get(n, 0) or 0), n)):
            value, weight = _num(breakdown[name]), _num(weights.get(name, 0))
            lines.append(f"  {name:<14} {value:>7} {weight:>7}")
    compared = placement.get("candidates")
    unchecked = placement.get("unchecked") or 0
    if compared is not None:
        extra = f", {unchecked} not examined" if unchecked else ""
        lines.append(f"  {compared} feasible node(s) compared{extra}")
    for alternative in placement.get("runner_ups") or []:
        score, cost = _num(alternative.get("score")), _num(alternative.get("cost_per_hour"), 4)
        lines.append(f"  runner-up {node(alternative.get('target'))}: score {score}, cost {cost}/h")
    rejected = placement.get("rejected") or {}
    for reason, count in sorted(rejected.items()):
        lines.append(f"  ruled out {count} node(s) {reason}")
    return lines


def _num(value: Any, digits: int = 3) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return "-"

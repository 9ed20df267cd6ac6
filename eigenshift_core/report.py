"""The evaluation report on disk: `report.json` (plain JSON, no NaN) and `report.png` (both arms, every judge)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from eigenshift_core.files import atomic_write
from eigenshift_core.intervention import Intervention
from eigenshift_core.metrics import finite_or_none

ARMS, COLORS = ["baseline", "intervention"], ["tab:blue", "tab:orange"]
DIVERSITY = {  # report key: bar label (all shares in [0, 1])
    "distinct_1": "distinct-1", "distinct_2": "distinct-2", "distinct_3": "distinct-3",
    "repetition_rate": "repetitive",
}


def write_report(report: dict[str, Any], out_dir: Path, intervention: Intervention | None = None) -> list[Path]:
    """Write `report.json` and `report.png` into `out_dir`, each atomically; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(clean(report), indent=2, allow_nan=False) + "\n"
    json_path, png_path = out_dir / "report.json", out_dir / "report.png"
    atomic_write(json_path, lambda path: path.write_text(text))
    figure = _report_figure(report, intervention)
    atomic_write(png_path, lambda path: figure.savefig(path, format="png", dpi=120))
    return [json_path, png_path]


def _report_figure(report: dict[str, Any], intervention: Intervention | None) -> Any:
    """A bare Agg `Figure` (no pyplot state, nothing left open): directions, toxicity under every judge,
    perplexity, and diversity / repetition panels, each only when the report has its figures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arms = [report.get("baseline") or {}, report.get("intervention") or {}]
    with_ppl = all(arm.get("perplexity") is not None for arm in arms)
    with_diversity = any(arm.get(key) is not None for arm in arms for key in DIVERSITY)
    panels = 1 + (intervention is not None) + with_ppl + with_diversity
    figure = Figure(figsize=(4.5 * panels, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = list(figure.subplots(1, panels, squeeze=False)[0])
    if intervention is not None:
        _plot_directions(axes.pop(0), intervention)
    primary = (report.get("protocol") or {}).get("scorer") or "scorer"
    judges = {primary: arms, **{name: [j.get("baseline") or {}, j.get("intervention") or {}]
                                for name, j in (report.get("judges") or {}).items()}}
    ax = axes.pop(0)
    _grouped_bars(ax, list(judges), [[arm.get("toxicity_rate") or {} for arm in judged]
                                     for judged in judges.values()])
    ax.set(ylabel="toxicity rate (95 % CI)", title="toxicity, by judge")
    if with_ppl:
        ax = axes.pop(0)
        ax.bar(ARMS, [arm["perplexity"] for arm in arms], color=COLORS)
        ax.set(ylabel="perplexity", title="fluency")
    if with_diversity:
        ax = axes.pop(0)
        _grouped_bars(ax, list(DIVERSITY.values()), [[{"value": arm.get(key)} for arm in arms] for key in DIVERSITY])
        ax.set(ylim=(0, 1.2), ylabel="share", title="diversity and repetition")
    return figure


def _grouped_bars(ax: Any, groups: list[str], estimates: list[list[dict[str, Any]]]) -> None:
    """Per group, a baseline and an intervention bar, with error bars where the estimate has an interval."""
    x = np.arange(len(groups))
    for arm, (label, color) in enumerate(zip(ARMS, COLORS, strict=True)):
        points = [group[arm] for group in estimates]
        # A missing figure is NaN (no bar), never 0: a bar at 0 would read as a perfect result.
        values = np.array([np.nan if p.get("value") is None else p["value"] for p in points], dtype=float)
        ends = np.array([[v if p.get(key) is None else p[key] for v, p in zip(values, points, strict=True)]
                         for key in ("low", "high")], dtype=float)  # (2: low/high, groups)
        errors = np.abs(ends - values)  # (2: below/above, groups)
        ax.bar(x + (arm - 0.5) * 0.4, values, width=0.4, yerr=errors if errors.any() else None, capsize=4,
               color=color, label=label)
    ax.set_xticks(x, groups, fontsize=8)
    ax.legend(fontsize=8)


def _plot_directions(ax: Any, intervention: Intervention) -> None:
    """The selection score of every direction by singular-value rank; the damped ones in red."""
    scores, chosen = intervention.scores.float().numpy(), intervention.indices.numpy()  # (d,), (k,)
    ax.plot(np.arange(scores.size), scores, lw=0.8, color="tab:gray")
    ax.scatter(chosen, scores[chosen], color="tab:red", s=14, zorder=3, label=f"damped (k={intervention.k})")
    criterion = intervention.info.get("criterion", "criterion")
    ax.set(xlabel="direction (singular-value rank)", ylabel=f"score ({criterion})", title="directions")
    ax.legend(fontsize=8)


def clean(value: Any) -> Any:
    """Plain JSON types: numpy scalars to Python, non-finite floats to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return finite_or_none(value)
    return value

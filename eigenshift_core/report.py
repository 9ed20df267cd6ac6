"""The evaluation report on disk: `report.json` (plain JSON, no NaN) and `report.png` (both arms)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from eigenshift_core.files import atomic_write
from eigenshift_core.intervention import Intervention
from eigenshift_core.metrics import finite_or_none


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
    """A bare Agg `Figure` (no pyplot state, nothing left open): directions, toxicity, perplexity panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arms = [report.get("baseline") or {}, report.get("intervention") or {}]
    with_ppl = all(arm.get("perplexity") is not None for arm in arms)
    panels = 1 + (intervention is not None) + with_ppl
    figure = Figure(figsize=(4.5 * panels, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = list(figure.subplots(1, panels, squeeze=False)[0])
    if intervention is not None:
        _plot_directions(axes.pop(0), intervention)
    labels, colors = ["baseline", "intervention"], ["tab:blue", "tab:orange"]
    rates = [arm.get("toxicity_rate") or {} for arm in arms]
    # A missing figure is NaN (no bar), never 0: a bar at 0 would read as a perfect result.
    values = [np.nan if rate.get("value") is None else rate["value"] for rate in rates]
    ends = [[v if r.get(key) is None else r[key] for v, r in zip(values, rates, strict=True)] for key in ("low", "high")]
    errors = np.abs(np.array(ends) - np.array(values))  # (2: below/above, arms)
    axes[0].bar(labels, values, yerr=errors, capsize=6, color=colors)
    axes[0].set(ylabel="toxicity rate (95 % CI)", title="toxicity")
    if with_ppl:
        axes[1].bar(labels, [arm["perplexity"] for arm in arms], color=colors)
        axes[1].set(ylabel="perplexity", title="fluency")
    return figure


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

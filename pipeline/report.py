"""The report: one row per setting, the paper's numbers beside ours, and the curves plot.

For each setting (the final node and its whole ancestry, each ancestor counted once, as the
paper counts "7M steps" for setting 4):

- the final model's validation loss and token accuracy;
- the train nodes and steps in its ancestry; their FLOPs and wall time added up;
- the compute needed to first reach the baseline's final accuracy: the ancestors' compute
  plus the final node's compute up to its first evaluation at or above that accuracy;
- the saving against the baseline's total compute.

Writes `report/table2.md`, `report/table2.csv` and `report/curves.png` (accuracy against
cumulative compute, like the paper's Figure 1) under the pipeline's runs directory.
"""

from __future__ import annotations

import csv
from pathlib import Path

from deepfusion_core.metrics import read_metrics
from pipeline import store
from pipeline.plan import Plan

COLUMNS = ["setting", "node", "description", "eval_loss", "eval_accuracy", "train_nodes",
           "train_steps", "flops", "wall_s", "flops_to_baseline_acc", "saving_vs_baseline",
           "paper_accuracy", "paper_train_nodes"]


def _curve(plan: Plan, name: str, prior_flops: float) -> list[tuple[float, float]]:
    """(cumulative FLOPs, accuracy) at each evaluation of node `name`."""
    node = plan.nodes[name]
    per_step = node.flops / node.train.steps
    return [(prior_flops + r["step"] * per_step, r["eval_accuracy"])
            for r in read_metrics(node.dir / "metrics.jsonl") if r["kind"] == "eval"]


def setting_rows(plan: Plan) -> tuple[list[dict], dict[str, list[tuple[float, float]]]]:
    """Report rows of every setting whose final node is done, and their accuracy curves."""
    rows, curves = [], {}
    for label, setting in plan.stages.settings.items():
        final = plan.nodes[setting.node]
        summary = store.done_record(final.dir)
        if summary is None:
            continue
        ancestry = plan.ancestry(setting.node)
        done = {n: store.done_record(plan.nodes[n].dir) for n in ancestry}
        trains = [n for n in ancestry if plan.nodes[n].kind == "train"]
        prior = sum(done[n]["flops"] for n in ancestry if n != setting.node)
        curves[label] = _curve(plan, setting.node, prior)
        rows.append({
            "setting": label, "node": setting.node, "description": setting.description,
            "eval_loss": summary["eval_loss"], "eval_accuracy": summary["eval_accuracy"],
            "train_nodes": len(trains),
            "train_steps": sum(plan.nodes[n].train.steps for n in trains),
            "flops": sum(done[n]["flops"] for n in ancestry),
            "wall_s": sum(done[n]["wall_s"] for n in ancestry),
            "paper_accuracy": setting.paper.accuracy,
            "paper_train_nodes": setting.paper.train_nodes,
        })
    base = next((r for r in rows if r["setting"] == plan.stages.baseline), None)
    for row in rows:
        reach = None
        if base is not None:
            reach = next((f for f, acc in curves[row["setting"]] if acc >= base["eval_accuracy"]),
                         None)
        row["flops_to_baseline_acc"] = reach
        row["saving_vs_baseline"] = (1 - reach / base["flops"]) if reach is not None else None
    return rows, curves


def _fmt(value, kind: str) -> str:
    if value is None:
        return "—"
    return {"pct": f"{100 * value:.2f}", "flops": f"{value:.3g}", "loss": f"{value:.4f}",
            "s": f"{value:.0f}", "saving": f"{100 * value:+.0f}%"}.get(kind, str(value))


def markdown_table(plan: Plan, rows: list[dict]) -> str:
    """Table 2 as Markdown, ours beside the paper's."""
    baseline = plan.stages.baseline
    lines = [
        f"# {plan.stages.name}: Table 2 at profile `{plan.profile}`",
        "",
        f"Accuracy is validation token accuracy in %. Compute counts every ancestor once. "
        f"\"to baseline acc.\" is the compute until the final model first reaches setting "
        f"{baseline}'s final accuracy; the saving is against setting {baseline}'s total.",
        "",
        "| setting | how L is made | accuracy | loss | train nodes | steps | FLOPs | wall s "
        "| FLOPs to baseline acc. | saving | paper accuracy | paper train nodes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['description']} | {_fmt(r['eval_accuracy'], 'pct')} | "
            f"{_fmt(r['eval_loss'], 'loss')} | {r['train_nodes']} | {r['train_steps']} | "
            f"{_fmt(r['flops'], 'flops')} | {_fmt(r['wall_s'], 's')} | "
            f"{_fmt(r['flops_to_baseline_acc'], 'flops')} | "
            f"{_fmt(r['saving_vs_baseline'], 'saving')} | "
            f"{_fmt(r['paper_accuracy'], '')} | {_fmt(r['paper_train_nodes'], '')} |")
    return "\n".join(lines) + "\n"


def plot_curves(plan: Plan, curves: dict, path: Path) -> None:
    """Accuracy against cumulative training compute, one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3,
                    label=f"{label}: {plan.stages.settings[label].description}")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative training FLOPs (all ancestors)")
    ax.set_ylabel("validation token accuracy (%)")
    ax.set_title(f"{plan.stages.name} — profile {plan.profile}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(plan: Plan) -> dict:
    """Write the Markdown, CSV and PNG report; returns their paths and the rows."""
    rows, curves = setting_rows(plan)
    out = plan.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "table2.md", "csv": out / "table2.csv", "plot": out / "curves.png"}
    paths["markdown"].write_text(markdown_table(plan, rows))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot_curves(plan, curves, paths["plot"])
    return {"rows": rows, **{k: str(v) for k, v in paths.items()}}

"""The GLUE part of the report: the paper's Tables 3, 4 and 5 and the GLUE-against-compute plot.

A setting's `finetuned` maps column labels (the paper's pretraining steps: 0, K/2, K, 2K) to
fine-tune nodes. For each (setting, column, replica) whose fine-tune node is done, a row holds
its GLUE average and per-task metrics, and the pretraining compute behind the model it
started from, split as the paper's Table 4 splits it:

- fusion-input compute: the train nodes before the model's last train node (the Smalls that
  were fused), each counted once;
- post-fusion compute: that last train node up to the step the fine-tuning started from
  (its FLOPs and wall time in proportion to the steps).

A row's GLUE average is over the tasks the node fine-tuned on, recomputed from its per-task
scores: a task only scored (the profile's eval_tasks) is in Table 5, not in the average.

The fine-tuning itself is the same for every row and is not counted. The GLUE saving of a
setting is against the baseline's last column (same seed): the compute of the setting's
cheapest column whose GLUE reaches the baseline's, as a fraction saved of the baseline's.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from deepfusion_core.glue import task as glue_task
from deepfusion_core.glue_metrics import glue_average
from pipeline.claims import Measured
from pipeline.job import FinetuneJob, TrainJob
from pipeline.plan import Plan
from pipeline.workdir import Workdir

_METRIC_NAMES = {"matthews_corrcoef": "MCC", "accuracy": "acc.", "f1": "F1",
                 "pearson": "Pearson", "spearman": "Spearman"}
CSV_COLUMNS = ["setting", "column", "replica", "node", "glue_average", "fusion_input_flops",
               "post_fusion_flops", "pretrain_flops", "fusion_input_wall_s", "post_fusion_wall_s",
               "pretrain_wall_s", "paper_glue"]


def _pretraining(plan: Plan, node: FinetuneJob) -> dict[str, float]:
    """The fusion-input and post-fusion compute (FLOPs, wall s) of the model `node` tunes."""
    [parent] = node.parents
    last_train = parent if isinstance(plan.nodes[parent], TrainJob) else None
    inputs = [n for n in plan.ancestry(parent)
              if n != last_train and isinstance(plan.nodes[n], TrainJob)]
    done = {n: Workdir(plan.nodes[n].dir).done_record() for n in [*inputs, last_train] if n}
    post_flops = post_wall = 0.0
    if last_train is not None:
        fraction = node.at_step / plan.nodes[last_train].train.steps
        post_flops = fraction * plan.nodes[last_train].flops
        post_wall = fraction * done[last_train].wall_s
    fusion_flops = sum(plan.nodes[n].flops for n in inputs)
    fusion_wall = sum(done[n].wall_s for n in inputs)
    return {"fusion_input_flops": fusion_flops, "post_fusion_flops": post_flops,
            "pretrain_flops": fusion_flops + post_flops, "fusion_input_wall_s": fusion_wall,
            "post_fusion_wall_s": post_wall, "pretrain_wall_s": fusion_wall + post_wall}


def glue_rows(plan: Plan) -> list[dict]:
    """One row per (setting, column, replica) whose fine-tune node is done."""
    rows = []
    for replica in range(plan.replicas):
        for label, setting in plan.stages.settings.items():
            for column, ref in setting.finetuned.items():
                name = plan.replica_name(ref, replica)
                node = plan.nodes[name]
                summary = Workdir(node.dir).done_record()
                if summary is None or summary.glue is None:
                    continue
                rows.append({"setting": label, "column": column, "replica": replica,
                             "node": name,
                             "glue_average": glue_average(summary.glue, node.data.tasks),
                             "glue": summary.glue, **_pretraining(plan, node),
                             "paper_glue": setting.paper.glue.get(column)})
    return rows


def _final(plan: Plan, rows: list[dict], label: str, replica: int) -> dict | None:
    """The row of a setting's last column in one replica."""
    columns = list(plan.stages.settings[label].finetuned)
    return next((r for r in rows if r["setting"] == label and r["replica"] == replica
                 and r["column"] == columns[-1]), None)


def measured(plan: Plan, rows: list[dict]) -> Measured:
    """What GLUE claims are judged on: the GLUE average per label (SETTING@COLUMN, and
    SETTING for its last column) and seed; each setting's saving per seed."""
    value, savings = {}, {}
    for r in rows:
        value[f"{r['setting']}@{r['column']}", r["replica"]] = r["glue_average"]
        if _final(plan, rows, r["setting"], r["replica"]) is r:
            value[r["setting"], r["replica"]] = r["glue_average"]
    baseline = plan.stages.baseline
    for label in plan.stages.settings:
        for replica in range(plan.replicas):
            base = _final(plan, rows, baseline, replica) if baseline else None
            mine = [r for r in rows if r["setting"] == label and r["replica"] == replica]
            if base is None or _final(plan, rows, label, replica) is None:
                continue
            if label == baseline:  # by definition: an earlier column may beat its last
                savings.setdefault(label, []).append(0.0)
                continue
            reached = [r["pretrain_flops"] for r in mine if r["glue_average"] >= base["glue_average"]]
            savings.setdefault(label, []).append(
                1 - min(reached) / base["pretrain_flops"] if reached else None)
    return Measured(value=value, savings=savings)


def _trained(plan: Plan, rows: list[dict]) -> list[str]:
    """The tasks the fine-tune nodes trained on (one profile: the same for every node)."""
    return list(plan.nodes[rows[0]["node"]].data.tasks) if rows else []


def _mean_sd(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def _cells(plan: Plan, rows: list[dict], label: str, column: str) -> list[dict]:
    return [r for r in rows if r["setting"] == label and r["column"] == column]


def markdown(plan: Plan, rows: list[dict], glue: Measured) -> list[str]:
    """Tables 3, 4 and 5 as Markdown lines (none without fine-tuned settings)."""
    settings = {k: s for k, s in plan.stages.settings.items() if s.finetuned}
    if not settings:
        return []
    columns = list(dict.fromkeys(c for s in settings.values() for c in s.finetuned))
    lines = ["", "#### GLUE after fine-tuning (the paper's Table 3)", "",
             "GLUE average of each model fine-tuned from the given pretraining step (for "
             "fusion, steps after fusion), mean over seeds (± sd); the paper's in brackets. "
             f"The average is over the tasks fine-tuned on ({', '.join(_trained(plan, rows))}).",
             "",
             "| setting | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, setting in settings.items():
        cells = []
        for column in columns:
            mine = [r["glue_average"] for r in _cells(plan, rows, label, column)]
            paper = setting.paper.glue.get(column)
            cells.append(("—" if not mine else _mean_sd(mine))
                         + ("" if paper is None else f" ({paper:g})"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += _table4(plan, rows, settings, glue) + _table5(plan, rows, settings)
    return lines


def _table4(plan: Plan, rows: list[dict], settings: dict, glue: Measured) -> list[str]:
    lines = ["", "#### Pretraining compute and GLUE (the paper's Table 4)", "",
             "Each setting's last column: the compute of the fusion inputs and after fusion "
             "(FLOPs, and wall time on this machine), GLUE, and the pretraining compute saved "
             f"against `{plan.stages.baseline}` to reach its GLUE.", "",
             "| setting | fusion inputs | after fusion | total | wall s | GLUE | saving | "
             "paper: TPU h, GLUE |", "|---|---|---|---|---|---|---|---|"]
    for label, setting in settings.items():
        column = list(setting.finetuned)[-1]
        mine = _cells(plan, rows, label, column)
        if not mine:
            continue
        mean = {k: statistics.fmean(r[k] for r in mine)
                for k in ("fusion_input_flops", "post_fusion_flops", "pretrain_flops",
                          "pretrain_wall_s")}
        saving = [s for s in glue.savings.get(label, []) if s is not None]
        saved = (f"{100 * statistics.fmean(saving):+.0f}%" if saving else "not reached")
        if saving and len(saving) < len(glue.savings[label]):
            saved += f" ({len(saving)} of {len(glue.savings[label])})"
        paper = setting.paper
        lines.append(
            f"| {label} | {mean['fusion_input_flops']:.3g} | {mean['post_fusion_flops']:.3g} | "
            f"{mean['pretrain_flops']:.3g} | {mean['pretrain_wall_s']:.0f} | "
            f"{_mean_sd([r['glue_average'] for r in mine])} | {saved} | "
            f"{'—' if paper.tpu_hours is None else f'{paper.tpu_hours:g} h'}, "
            f"{paper.glue.get(column, '—')} |")
    return lines


def _table5(plan: Plan, rows: list[dict], settings: dict) -> list[str]:
    """Per task, each setting's last column; split four tasks to a table (a page's width)."""
    finals = {label: _cells(plan, rows, label, list(s.finetuned)[-1])
              for label, s in settings.items()}
    finals = {k: v for k, v in finals.items() if v}
    if not finals:
        return []
    first = next(iter(finals.values()))[0]
    tasks = [t for t in plan.nodes[first["node"]].eval_tasks if t in first["glue"]]
    trained = _trained(plan, rows)
    lines = ["", "#### GLUE per task (the paper's Table 5)", "",
             "Each setting's last column, mean over seeds; the metrics are T5's, in points "
             "(MCC: Matthews correlation). A task \"not trained on\" was only scored, "
             "zero-shot, and is not in the GLUE average."]
    for start in range(0, len(tasks), 4):
        group = tasks[start:start + 4]
        headers = [f"{glue_task(t).directory} {_METRIC_NAMES[m]}"
                   + ("" if t in trained else " (not trained on)")
                   for t in group for m in glue_task(t).metrics]
        lines += ["", "| setting | " + " | ".join(headers) + " |",
                  "|---|" + "---|" * len(headers)]
        for label, mine in finals.items():
            cells = [f"{statistics.fmean(r['glue'][t][m] for r in mine):.1f}"
                     for t in group for m in glue_task(t).metrics]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def plot(plan: Plan, rows: list[dict], path: Path) -> None:
    """GLUE average against pretraining compute: a line per setting through its columns
    (seeds averaged), each point labelled with its column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=110)
    for i, (label, setting) in enumerate(plan.stages.settings.items()):
        points = []
        for column in setting.finetuned:
            mine = _cells(plan, rows, label, column)
            if mine:
                points.append((statistics.fmean(r["pretrain_flops"] for r in mine),
                               statistics.fmean(r["glue_average"] for r in mine), column))
        if not points:
            continue
        xs, ys, names = zip(*points)
        ax.plot(xs, ys, marker="o", color=f"C{i}", label=f"{label}: {setting.description}")
        for x, y, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("pretraining FLOPs (fusion inputs included)")
    ax.set_ylabel("GLUE average")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.set_title(f"{plan.stages.name}, profile {plan.profile}: GLUE against compute")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

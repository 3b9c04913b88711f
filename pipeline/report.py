"""The report: one row per setting, the paper's numbers beside ours, the paper's claims
checked, and the curves plot.

For each setting and each replica (an independent run of the whole DAG: a profile's
`replicas`) the report takes the final node and its whole ancestry, each ancestor counted
once, as the paper counts "7M steps" for setting 4:

- the final model's validation loss and token accuracy;
- the train nodes and steps in its ancestry; their FLOPs and wall time added up;
- the compute needed to first reach the baseline's final accuracy (same replica): the
  ancestors' compute plus the final node's compute up to its first evaluation at or above it;
  the same for the baseline's final loss;
- the savings against the baseline's total compute.

The table gives the mean over the replicas that are done (± the sample standard deviation of
the accuracy), the CSV one row per setting and replica. Writes
`report/<profile>/report.md`, `settings.csv` and `curves.png` (accuracy against cumulative
compute, like the paper's Figure 1) under the pipeline's runs directory.
"""

from __future__ import annotations

import csv
import re
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from deepfusion_core import workdir_lock
from deepfusion_core.metrics import EvalRecord
from pipeline import store
from pipeline import glue_report
from pipeline.claims import Measured, check_claims
from pipeline.plan import Plan
from pipeline.workdir import NodeSummary, Workdir

COLUMNS = ["setting", "replica", "node", "description", "eval_loss", "eval_accuracy",
           "train_nodes", "train_steps", "flops", "wall_s", "flops_to_baseline_acc",
           "saving_to_baseline_acc", "flops_to_baseline_loss", "saving_to_baseline_loss",
           "eval_loss_sum", "paper_accuracy", "paper_accuracy_sd", "paper_loss_sum",
           "paper_train_nodes"]
Curve = list[tuple[float, float, float]]  # (cumulative FLOPs, accuracy, loss) per evaluation


def _curve(plan: Plan, name: str, prior_flops: float) -> Curve:
    """(cumulative FLOPs, accuracy, loss) at each evaluation of node `name`."""
    node = plan.nodes[name]
    per_step = node.flops / node.train.steps
    return [(prior_flops + r.step * per_step, r.eval_accuracy, r.eval_loss)
            for r in Workdir(node.dir).metrics_records() if isinstance(r, EvalRecord)]


def replica_rows(plan: Plan) -> tuple[list[dict], dict[tuple[str, int], Curve]]:
    """One row per (setting, replica) whose final node is done, and their accuracy curves."""
    rows, curves = [], {}
    for replica in range(plan.replicas):
        for label, setting in plan.stages.settings.items():
            final = plan.replica_name(setting.node, replica)
            summary = Workdir(plan.nodes[final].dir).done_record()
            if summary is None:
                continue
            ancestry = plan.ancestry(final)
            done = {n: Workdir(plan.nodes[n].dir).done_record() for n in ancestry}
            trains = [n for n in ancestry if plan.nodes[n].kind == "train"]
            prior = sum(done[n].flops for n in ancestry if n != final)
            curves[label, replica] = _curve(plan, final, prior)
            rows.append({
                "setting": label, "replica": replica, "node": final,
                "description": setting.description,
                "eval_loss": summary.eval_loss, "eval_accuracy": summary.eval_accuracy,
                "train_nodes": len(trains),
                "train_steps": sum(plan.nodes[n].train.steps for n in trains),
                "flops": sum(done[n].flops for n in ancestry),
                "wall_s": sum(done[n].wall_s for n in ancestry),
                "eval_loss_sum": summary.eval_loss_sum,
                "paper_accuracy": setting.paper.accuracy,
                "paper_accuracy_sd": setting.paper.accuracy_sd,
                "paper_loss_sum": setting.paper.loss_sum,
                "paper_train_nodes": setting.paper.train_nodes,
            })
    for row in rows:
        base = next((r for r in rows if r["setting"] == plan.stages.baseline
                     and r["replica"] == row["replica"]), None)
        curve = curves[row["setting"], row["replica"]]
        for metric, key, reached in (
                ("acc", "eval_accuracy", lambda point, target: point[1] >= target),
                ("loss", "eval_loss", lambda point, target: point[2] <= target)):
            reach = None
            if base is row:  # by definition: a noisy earlier evaluation may beat its last
                reach = row["flops"]
            elif base is not None:
                reach = next((p[0] for p in curve if reached(p, base[key])), None)
            row[f"flops_to_baseline_{metric}"] = reach
            row[f"saving_to_baseline_{metric}"] = (1 - reach / base["flops"]
                                                   if reach is not None else None)
    return rows, curves


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(plan: Plan, rows: list[dict]) -> list[dict]:
    """Per setting: the mean over its done replicas (accuracy sd where there are two or more);
    compute to the baseline's accuracy and the saving averaged over the replicas that got
    there, `reached` of `replicas`."""
    out = []
    for label in plan.stages.settings:
        mine = [r for r in rows if r["setting"] == label]
        if not mine:
            continue
        accs = [r["eval_accuracy"] for r in mine]
        out.append({
            **{k: mine[0][k] for k in ("setting", "description", "train_nodes", "train_steps",
                                      "paper_accuracy", "paper_accuracy_sd", "paper_loss_sum",
                                      "paper_train_nodes")},
            "replicas": len(mine),
            "eval_accuracy": statistics.fmean(accs),
            "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else None,
            "eval_loss": _mean([r["eval_loss"] for r in mine]),
            "eval_loss_sum": _mean([r["eval_loss_sum"] for r in mine]),
            "loss_sd": (statistics.stdev([r["eval_loss"] for r in mine])
                        if len(mine) > 1 else None),
            "flops": _mean([r["flops"] for r in mine]),
            "wall_s": _mean([r["wall_s"] for r in mine]),
            **{f"{k}_{m}": _mean([r[f"{k}_{m}"] for r in mine])
               for k in ("flops_to_baseline", "saving_to_baseline") for m in ("acc", "loss")},
            **{f"reached_{m}": sum(r[f"flops_to_baseline_{m}"] is not None for r in mine)
               for m in ("acc", "loss")},
        })
    return out


def _fmt(value, kind: str = "") -> str:
    if value is None:
        return "—"
    return {"pct": f"{100 * value:.2f}", "flops": f"{value:.3g}", "loss": f"{value:.4f}",
            "s": f"{value:.0f}", "sum": f"{value:.2f}", "saving": f"{100 * value:+.0f}%"}.get(kind, str(value))


def _settings_columns() -> list[tuple[str, Callable[[dict], str]]]:
    """The settings table's columns: (header, the cell of a summary row)."""
    def accuracy(r):
        sd = "" if r["accuracy_sd"] is None else f" ± {100 * r['accuracy_sd']:.2f}"
        return _fmt(r["eval_accuracy"], "pct") + sd

    def loss(r):
        return _fmt(r["eval_loss"], "loss") + ("" if r["loss_sd"] is None
                                              else f" ± {r['loss_sd']:.4f}")

    def reach(m):
        return lambda r: (_fmt(r[f"flops_to_baseline_{m}"], "flops")
                          + (f" ({r[f'reached_{m}']} of {r['replicas']})"
                             if 0 < r[f"reached_{m}"] < r["replicas"] else ""))

    return [("setting", lambda r: r["setting"]),
            ("how the model is made", lambda r: r["description"]),
            ("accuracy", accuracy), ("loss", loss), ("seeds", lambda r: f"{r['replicas']}"),
            ("train nodes", lambda r: f"{r['train_nodes']}"),
            ("steps", lambda r: f"{r['train_steps']}"),
            ("FLOPs", lambda r: _fmt(r["flops"], "flops")),
            ("wall s", lambda r: _fmt(r["wall_s"], "s")),
            ("FLOPs to baseline acc.", reach("acc")),
            ("saving", lambda r: _fmt(r["saving_to_baseline_acc"], "saving")),
            ("FLOPs to baseline loss", reach("loss")),
            ("saving", lambda r: _fmt(r["saving_to_baseline_loss"], "saving")),
            ("loss per sequence", lambda r: _fmt(r["eval_loss_sum"], "sum")),
            ("paper accuracy", lambda r: _fmt(r["paper_accuracy"]) + (
                "" if r["paper_accuracy_sd"] is None else f" ± {r['paper_accuracy_sd']:g}")),
            ("paper loss (sum)", lambda r: _fmt(r["paper_loss_sum"], "flops")),
            ("paper train nodes", lambda r: _fmt(r["paper_train_nodes"]))]


def _settings_tables(summary: list[dict], max_columns: int | None) -> list[str]:
    """The settings table's lines; split into tables of at most `max_columns` columns, each
    led by the setting, where a page is too narrow for one."""
    columns = _settings_columns()
    width = len(columns) if max_columns is None else max(2, max_columns)
    groups = [[columns[0], *columns[i:i + width - 1]] for i in range(1, len(columns), width - 1)]
    lines: list[str] = []
    for group in groups:
        lines += ([""] if lines else []) + [
            "| " + " | ".join(header for header, _ in group) + " |",
            "|" + "---|" * len(group)]
        lines += ["| " + " | ".join(cell(r) for _, cell in group) + " |" for r in summary]
    return lines


def markdown_report(plan: Plan, summary: list[dict], claims: list[dict],
                    max_columns: int | None = None, glue_rows: list[dict] = (),
                    glue: Measured | None = None) -> str:
    """The settings table (ours beside the paper's), the GLUE tables where settings are
    fine-tuned, and the claims, as Markdown; with `max_columns`, the settings table as
    several narrower ones (a UI's page)."""
    baseline = plan.stages.baseline
    lines = [
        f"### {plan.stages.name} at profile `{plan.profile}`",
        "",
        ("Accuracy: validation token accuracy in %, and loss: validation loss per target "
         "token, each the mean over seeds (± their standard deviation). Compute counts every "
         "ancestor once. \"To baseline acc.\" (\"loss\") is the compute until the final model "
         f"first reaches the final accuracy (loss) of the baseline (`{baseline}`, same seed), "
         "averaged over the seeds that reach it; each saving is against the baseline's total."),
        "",
        *_settings_tables(summary, max_columns),
    ]
    every = [d for n in plan.nodes.values() if (d := Workdir(n.dir).done_record()) is not None]
    done = [d for d in every if d.kind == "train"]
    total = sum(n.kind == "train" for n in plan.nodes.values())
    lines += ["", (f"{len(done)} of {total} train nodes done ({plan.replicas} "
                   f"seed{'s' if plan.replicas > 1 else ''}); their training took "
                   f"{sum(d.wall_s for d in done) / 60:.0f} min of wall time and "
                   f"{sum(d.flops for d in done):.3g} FLOPs in all.")]
    lines += _code_versions_line(every)
    if glue is not None:
        lines += glue_report.markdown(plan, list(glue_rows), glue)
    if claims:
        lines += ["", ("Each claim is judged on the paired differences per seed (a setting "
                       "against another of the same seed): their mean [95% interval]. It holds "
                       "when the interval lies on the claimed side, is contradicted when it lies "
                       "on the other, inconclusive when it straddles; one seed gives no "
                       "interval."),
                  "", "| the paper's claim | by | measured here | verdict | seeds |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c['claim']} | {c['metric']} | {c['measured'] or '—'} | {c['verdict']} | "
                  f"{c['seeds']} |" for c in claims]
    return "\n".join(lines) + "\n"


def _code_versions_line(done: list[NodeSummary]) -> list[str]:
    """A warning when the done nodes were made by more than one version of the code (their
    DONE's `code`), which the fingerprints do not tell apart; nothing otherwise."""
    made = Counter(d.code for d in done if d.code)
    if len(made) < 2:
        return []
    counts = ", ".join(f"`{code}` {count}" for code, count in made.most_common())
    return ["", (f"**The nodes were made by {len(made)} versions of the code** (nodes per "
                 f"version: {counts}): a code change between them may have moved their "
                 f"figures. A new runs directory, or `deepfusion flow --force`, remakes every "
                 f"node with this one.")]


def plot_curves(plan: Plan, curves: dict[tuple[str, int], Curve], path: Path) -> None:
    """Accuracy and loss against cumulative training compute, side by side: one colour per
    setting, one line per seed (the first seed solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    colours = {label: f"C{i}" for i, label in enumerate(plan.stages.settings)}
    for (label, replica), points in curves.items():
        points = [p for p in points if p[0] > 0]  # the log axis has no place for zero
        if not points:
            continue
        xs, accs, losses = zip(*points)
        style = {"marker": "o", "markersize": 2.5, "linewidth": 1.2, "color": colours[label],
                 "alpha": 1.0 if replica == 0 else 0.45}
        acc_ax.plot(xs, [100 * a for a in accs], **style,
                    label=f"{label}: {plan.stages.settings[label].description}"
                    if replica == 0 else None)
        loss_ax.plot(xs, losses, **style)
    for ax, ylabel in ((acc_ax, "validation token accuracy (%)"),
                       (loss_ax, "validation loss per target token (nats)")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # they overlap
        ax.set_xlabel("cumulative training FLOPs (all ancestors)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if acc_ax.get_legend_handles_labels()[0]:  # a store with no evaluations draws none
        acc_ax.legend(fontsize=7)
    fig.suptitle(f"{plan.stages.name}, profile {plan.profile}"
                 + (f" ({plan.replicas} seeds)" if plan.replicas > 1 else ""))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(plan: Plan) -> dict:
    """Write the Markdown, CSV and PNG report; returns their paths, the summary and claims."""
    rows, curves = replica_rows(plan)
    summary = summarize(plan, rows)
    fine_tuned = any(s.finetuned for s in plan.stages.settings.values())
    glue_rows = glue_report.glue_rows(plan) if fine_tuned else []
    glue = glue_report.measured(plan, glue_rows) if fine_tuned else None
    claims = check_claims(plan, rows, glue)
    out = store.report_path(plan.root, plan.profile)
    paths = {"markdown": out / "report.md", "csv": out / "settings.csv",
             "plot": out / "curves.png"}
    if fine_tuned:
        paths.update(glue_csv=out / "glue.csv", glue_plot=out / "glue.png")
    # A `run` and a flow ending together write one report after the other, not interleaved.
    with workdir_lock.hold(out, f"report {out}", wait=True,
                           log=lambda m: print(m, file=sys.stderr)):
        paths["markdown"].write_text(markdown_report(plan, summary, claims,
                                                     glue_rows=glue_rows, glue=glue))
        _write_csv(paths["csv"], COLUMNS, rows)
        plot_curves(plan, curves, paths["plot"])
        if fine_tuned:
            _write_csv(paths["glue_csv"], glue_report.CSV_COLUMNS, [
                {**{k: r[k] for k in glue_report.CSV_COLUMNS},
                 **{f"{t} {m}": v for t, ms in r["glue"].items() for m, v in ms.items()}}
                for r in glue_rows])
            glue_report.plot(plan, glue_rows, paths["glue_plot"])
    return {"rows": rows, "summary": summary, "claims": claims, "glue_rows": glue_rows,
            "glue": glue, **{k: str(v) for k, v in paths.items()}}


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """`rows` as CSV: `columns` first, then any others the first row has (per-task scores)."""
    extra = [k for k in (rows[0] if rows else {}) if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*columns, *extra])
        writer.writeheader()
        writer.writerows(rows)


_BLOCK = re.compile(r"^(<!-- report (?P<key>\S+ \S+) -->\n).*?^(<!-- end report -->)$",
                    re.DOTALL | re.MULTILINE)


def _blocks(text: str, plan: Plan) -> list[re.Match]:
    key = f"{plan.stages_path.name} {plan.profile}"
    return [m for m in _BLOCK.finditer(text) if m["key"] == key]


def has_block(document: Path, plan: Plan) -> bool:
    """Whether a document has this plan's block `<!-- report STAGES PROFILE -->`."""
    return bool(_blocks(document.read_text(), plan))


def update_document(document: Path, plan: Plan, report: dict) -> bool:
    """Replace the block `<!-- report STAGES PROFILE -->` ... `<!-- end report -->` of a
    Markdown document (REPRODUCTION.md) with this report, its plot copied beside the document.
    Returns whether the document had such a block."""
    text = document.read_text()
    found = _blocks(text, plan)
    if not found:
        return False
    figures = document.parent / "figures"
    figures.mkdir(exist_ok=True)
    body = Path(report["markdown"]).read_text()
    for key, suffix in (("plot", ""), ("glue_plot", "-glue")):
        if key in report:
            figure = figures / f"{plan.stages.name}-{plan.profile}{suffix}.png"
            figure.write_bytes(Path(report[key]).read_bytes())
            body += (f"\n![{plan.stages.name} at {plan.profile}{suffix}]"
                     f"({figure.relative_to(document.parent)})\n")
    m = found[0]
    text = text[:m.start()] + m.group(1) + body + m.group(3) + text[m.end():]
    store.write_text_atomic(document, text)
    return True

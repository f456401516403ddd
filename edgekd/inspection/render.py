"""The report's outputs: ``fidelity.json``, ``fidelity.md``, the PNG plots and the summary.

`render_markdown` turns the dict that `edgekd.inspection.run.run_inspect` returns into
Markdown tables, `summarize` picks its headline numbers for a run's ``report.json``.
matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from edgekd.deploy.host import describe_host
from edgekd.inspection.analysis import ATTACK_EPS_FRACTIONS

__all__ = ["render_markdown", "summarize"]


# ------------------------------------------------------------------ outputs
def _write_json(path: Path, report: dict[str, Any]) -> None:
    from edgekd.reporting.report import write_json_atomic

    write_json_atomic(path, report)


def _write_plots(
    out_dir: Path,
    reliability: dict[str, dict[str, list[float]]],
    robustness: dict[str, dict[str, Any]],
) -> list[str]:
    from edgekd.reporting.plots import plot_certified_accuracy, plot_reliability

    names = []
    for role, bins in reliability.items():
        name = f"reliability_{role}.png"
        plot_reliability(
            bins, out_dir / name, title=f"{role.replace('_', ' ').capitalize()} reliability"
        )
        names.append(name)
    curves = {
        role: block["certificate"]
        for role, block in robustness.items()
        if isinstance(block.get("certificate"), dict)
    }
    if curves:
        plot_certified_accuracy(curves, out_dir / "certified_accuracy.png")
        names.append("certified_accuracy.png")
    return names


# ------------------------------------------------------------------ markdown
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _interval(ci: dict[str, float]) -> str:
    return f"{_fmt(ci['point'])} [{_fmt(ci['lower'])}, {_fmt(ci['upper'])}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    """``fidelity.md``: the report's numbers as Markdown tables."""
    t, s = report["teacher"], report["student"]
    level = int(round(100 * report["settings"]["bootstrap_level"]))
    lines = [
        "# Student fidelity report",
        "",
        f"Teacher `{t['path']}` ({t['format']}), student `{s['path']}` ({s['format']}); "
        f"{report['data']['dataset']} devices' test split, {report['data']['test_size']} samples, "
        f"seed {report['data']['seed']}. Intervals: {level} % percentile bootstrap, "
        f"{report['settings']['bootstrap_resamples']} resamples.",
        "",
        f"Measured on {describe_host(report['host'])}." if "host" in report else "",
        "",
    ]
    lines += _scores_markdown(t, s)
    lines += _fidelity_markdown(report["fidelity"])

    lines += ["## Per-class ECE", ""]
    names = report["data"]["class_names"]
    rows = [
        [str(names[c]), str(report["data"]["pool_class_counts"][c]), _fmt(te), _fmt(se)]
        for c, (te, se) in enumerate(zip(t["per_class_ece"], s["per_class_ece"], strict=True))
    ]
    lines += _table(["class", "pool count", "teacher", "student"], rows)

    robust = {"teacher": t["robustness"], "student": s["robustness"]}
    if "compressed" in report:
        c = report["compressed"]
        robust["compressed"] = c["robustness"]
        lines += [f"Compressed student `{c['path']}`: accuracy {_fmt(c['accuracy'])}.", ""]
    lines += _robustness_markdown(robust)
    lines += _sensitivity_markdown(report["layer_sensitivity"])
    return "\n".join(lines)


def _scores_markdown(t: dict[str, Any], s: dict[str, Any]) -> list[str]:
    """Teacher and student scores with their intervals, then the temperature scaling."""
    lines = ["## Scores", ""]
    rows = [
        [name, _interval(t["bootstrap"][key]), _interval(s["bootstrap"][key])]
        for name, key in (("accuracy", "accuracy"), ("NLL", "nll"), ("Brier", "brier"))
    ]
    mm_t, mm_s = t["minority_majority_ece"], s["minority_majority_ece"]
    rows += [
        ["ECE (15 bins)", _fmt(t["ece"]), _fmt(s["ece"])],
        ["minority-class ECE", _fmt(mm_t["minority_ece"]), _fmt(mm_s["minority_ece"])],
        ["majority-class ECE", _fmt(mm_t["majority_ece"]), _fmt(mm_s["majority_ece"])],
        ["macro recall", _fmt(t["macro_recall"]), _fmt(s["macro_recall"])],
        ["min class recall", _fmt(t["min_class_recall"]), _fmt(s["min_class_recall"])],
        [
            "dark-knowledge entropy (max)",
            f"{_fmt(t['dark_knowledge']['entropy'])} ({_fmt(t['dark_knowledge']['max'])})",
            f"{_fmt(s['dark_knowledge']['entropy'])} ({_fmt(s['dark_knowledge']['max'])})",
        ],
    ]
    lines += _table(["metric", "teacher", "student"], rows)

    if "calibrated" in t:
        lines += ["## Temperature scaling (fitted on the server's held-out split)", ""]
        rows = [
            [role, _fmt(b["calibrated"]["temperature"], 3)]
            + [f"{_fmt(b[m])} → {_fmt(b['calibrated'][m])}" for m in ("ece", "nll", "brier")]
            for role, b in (("teacher", t), ("student", s))
        ]
        lines += _table(["model", "T", "ECE", "NLL", "Brier"], rows)
    return lines


def _fidelity_markdown(fid: dict[str, Any]) -> list[str]:
    """Agreement, KL and rank order with the teacher, then the intervals' comparison."""
    lines = ["## Fidelity to the teacher", ""]
    rows = [
        ["top-1 agreement", _fmt(fid["agreement"])],
        ["KL(teacher ‖ student), nats", _fmt(fid["kl_to_teacher"])],
    ]
    rows += [[key.replace("_", " "), _fmt(value)] for key, value in fid["rank_order"].items()]
    lines += _table(["measure", "value"], rows)

    lines += ["## Uncertainty of the scores: student vs teacher intervals", ""]
    rows = [
        [
            name,
            _fmt(u["covers_teacher_point"]),
            _fmt(u["width_ratio"], 3),
            _fmt(u["overconfident"]),
        ]
        for name, u in fid["uq"].items()
    ]
    lines += _table(
        ["metric", "student interval covers teacher", "width ratio", "overconfident (< 0.5)"], rows
    )
    return lines


def _sensitivity_markdown(sensitivity: dict[str, Any] | str) -> list[str]:
    """FGSM accuracy with each layer swapped for its compressed version, or why not."""
    lines = ["## Layer sensitivity (FGSM)", ""]
    if isinstance(sensitivity, str):
        return lines + [sensitivity, ""]
    rows = [
        [str(r["layer"]), _fmt(r["fgsm_accuracy"]), _fmt(r["delta"])] for r in sensitivity["layers"]
    ]
    lines += _table(["layer swapped to compressed", "FGSM accuracy", "change"], rows)
    if sensitivity["layers"]:
        top = sensitivity["layers"][0]
        lines += [
            f"Compressing `{top['layer']}` moved FGSM accuracy most ({_fmt(top['delta'])}).",
            "",
        ]
    return lines


def _robustness_markdown(blocks: dict[str, dict[str, Any]]) -> list[str]:
    """Adversarial and certified accuracy for every model that has a torch form."""
    lines = ["## Adversarial accuracy (input space, L-inf)", ""]
    for role, block in blocks.items():
        if isinstance(block["adversarial"], str):
            lines += [f"{role}: {block['adversarial']}.", ""]
    attacked = [(role, b) for role, b in blocks.items() if isinstance(b["adversarial"], list)]
    if attacked:
        header = ["eps (× input std)"]
        for role, _ in attacked:
            header += [f"{role} FGSM", f"{role} PGD-10"]
        rows = []
        for i, fraction in enumerate(ATTACK_EPS_FRACTIONS):
            row = [f"{_fmt(attacked[0][1]['adversarial'][i]['eps'])} ({fraction})"]
            for _, b in attacked:
                row += [
                    _fmt(b["adversarial"][i]["fgsm_accuracy"]),
                    _fmt(b["adversarial"][i]["pgd_accuracy"]),
                ]
            rows.append(row)
        lines += _table(header, rows)

    lines += ["## Certified accuracy of the linear head (feature space, L-inf)", ""]
    certified = [
        (role, b["certificate"]) for role, b in blocks.items() if isinstance(b["certificate"], dict)
    ]
    for role, block in blocks.items():
        if isinstance(block["certificate"], str):
            lines += [f"{role}: {block['certificate']}.", ""]
    if certified:
        lines += [
            "Median certified radius of the correctly classified samples: "
            + ", ".join(
                f"{role} {_fmt(c['median_radius_correct'])} (D = {c['feature_dim']})"
                for role, c in certified
            ),
            "",
        ]
        eps = certified[0][1]["eps"]
        rows = [
            [_fmt(e)] + [_fmt(c["certified_accuracy"][i]) for _, c in certified]
            for i, e in enumerate(eps)
            if i % 4 == 0  # every 4th grid point keeps the table short; the PNG has all
        ]
        lines += _table(["eps"] + [role for role, _ in certified], rows)
    return lines


# ------------------------------------------------------------------ summary
def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a fidelity report, for ``report.json``'s ``fidelity``."""
    student, teacher, fid = report["student"], report["teacher"], report["fidelity"]
    adversarial = student.get("robustness", {}).get("adversarial")
    out = {
        "student": student["path"],
        "format": student["format"],
        "accuracy": student["accuracy"],
        "teacher_accuracy": teacher["accuracy"],
        "ece": student["ece"],
        "teacher_ece": teacher["ece"],
        "minority_ece": student["minority_majority_ece"].get("minority_ece"),
        "majority_ece": student["minority_majority_ece"].get("majority_ece"),
        "nll": student["nll"],
        "brier": student["brier"],
        "agreement": fid["agreement"],
        "kl_to_teacher": fid["kl_to_teacher"],
        **fid["rank_order"],
        "uq": fid["uq"],
        "dark_knowledge": student["dark_knowledge"],
        "fgsm_accuracy": _fgsm_row(adversarial),
    }
    if "compressed" in report:
        out["compressed_accuracy"] = report["compressed"]["accuracy"]
        out["compressed_fgsm_accuracy"] = _fgsm_row(
            report["compressed"]["robustness"]["adversarial"]
        )
    layers = report.get("layer_sensitivity")
    if isinstance(layers, dict) and layers["layers"]:
        out["most_sensitive_layer"] = layers["layers"][0]["layer"]
    return out


def _fgsm_row(adversarial: list[dict[str, float]] | str) -> list[float] | str:
    if isinstance(adversarial, str):
        return adversarial
    return [row["fgsm_accuracy"] for row in adversarial]

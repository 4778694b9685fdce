"""The demo's report: one row per evaluated model, the table, the claim put to the test, and the plot."""

from __future__ import annotations

from pathlib import Path


def _row(name: str, kind: str, metrics: dict) -> dict:
    per_domain = {d: float(v) for d, v in metrics["per_domain"].items()}
    worst_domain = max(per_domain, key=per_domain.get)
    return {"name": name, "kind": kind, "per_domain": per_domain, "mean": float(metrics["mean"]),
            "worst": per_domain[worst_domain], "worst_domain": worst_domain, "ece": float(metrics["ece"])}


def format_table(rows: list[dict], domains: list[str]) -> str:
    cols = [*domains, "mean", "worst", "ECE"]
    width = max(len(r["name"]) for r in rows) + 2
    lines = [f"{'model':<{width}}{'kind':<9}" + "".join(f"{c:>9}" for c in cols),
             "-" * (width + 9 + 9 * len(cols))]
    for r in rows:
        vals = [r["per_domain"][d] for d in domains] + [r["mean"], r["worst"], r["ece"]]
        lines.append(f"{r['name']:<{width}}{r['kind']:<9}" + "".join(f"{v:>9.3f}" for v in vals))
    return "\n".join(lines)


ECE_SLACK = 0.005  # the ensemble student may be at most half a point of ECE less calibrated than plain training


def claim(rows: list[dict]) -> tuple[bool, str]:
    """The claim the tool exists to make true, part by part: the ensemble student's worst-domain and mean
    loss below the CE-only student's and every single-teacher student's, its ECE at most CE's + 0.5 points,
    and its worst domain below every teacher's worst. Returns (all hold, one line per part)."""
    by_name = {r["name"]: r for r in rows}
    ens = by_name["student-ensemble"]
    rivals = {r["name"].removeprefix("student-"): r for r in rows
              if r["name"] == "student-ce" or r["name"].startswith("student-kd-")}
    teachers = {r["name"]: r for r in rows if r["kind"] == "teacher"}
    parts = []
    for key in ("worst", "mean"):
        beaten = {n: r[key] for n, r in rivals.items()}
        ok = all(ens[key] < v for v in beaten.values())
        margin = min(beaten.values()) - ens[key] if beaten else float("nan")
        parts.append((ok, f"{key} {ens[key]:.3f} {'<' if ok else 'NOT <'} every other student's "
                          f"({', '.join(f'{n} {v:.3f}' for n, v in beaten.items())}), margin {margin:+.3f}"))
    if "student-ce" in by_name:
        ce_ece = by_name["student-ce"]["ece"]
        ok = ens["ece"] <= ce_ece + ECE_SLACK
        parts.append((ok, f"ECE {100 * ens['ece']:.2f} pts {'<=' if ok else 'NOT <='} CE-only's {100 * ce_ece:.2f} + 0.5"))
    if teachers:
        ok = all(ens["worst"] < r["worst"] for r in teachers.values())
        listed = ", ".join(f"{n.removeprefix('teacher-')} {r['worst']:.3f}" for n, r in teachers.items())
        parts.append((ok, f"worst {ens['worst']:.3f} {'<' if ok else 'NOT <'} every teacher's worst ({listed})"))
    holds = all(ok for ok, _ in parts)
    return holds, "the ensemble student's " + "; ".join(text for _, text in parts)


def plot(rows: list[dict], domains: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(rows))
    width = 0.8 / len(domains)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.2 * len(rows)), 4.8), dpi=120)
    for j, d in enumerate(domains):
        vals = [r["per_domain"][d] for r in rows]
        worst = [max(r["per_domain"], key=r["per_domain"].get) == d for r in rows]
        ax.bar(x + (j - (len(domains) - 1) / 2) * width, vals, width, label=d, color=f"C{j}",
               edgecolor=["black" if w else "none" for w in worst], linewidth=1.5)
    ens = next((r for r in rows if r["name"] == "student-ensemble"), None)
    if ens is not None:
        ax.axhline(ens["worst"], color="black", linestyle="--", linewidth=1)
    n_teachers = sum(r["kind"] == "teacher" for r in rows)
    ax.axvline(n_teachers - 0.5, color="grey", linewidth=1)
    top = max(max(r["per_domain"].values()) for r in rows)
    ax.text(n_teachers / 2 - 0.5, top * 1.04, "teachers", ha="center", color="grey")
    ax.text((n_teachers + len(rows)) / 2 - 0.5, top * 1.04, "students (same size, steps, rows)", ha="center", color="grey")
    ax.set_ylim(0, top * 1.12)
    ax.set_xticks(x, [r["name"] for r in rows], rotation=20, ha="right")
    for label in ax.get_xticklabels():
        if label.get_text() == "student-ensemble":
            label.set_fontweight("bold")
    ax.set_ylabel("held-out loss (nats/token, lower is better)")
    ax.set_title("chorus demo: per-domain held-out loss (outlined: each model's worst domain)")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=f"C{j}", label=d) for j, d in enumerate(domains)]
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1, label="ensemble student's worst"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

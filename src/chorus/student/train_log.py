"""What `chorus train` writes while it runs: metrics.csv (and TensorBoard when installed), and the ensemble
diagnostics of the pooled target."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from chorus.distill import ensemble


class MetricsLog:
    """metrics.csv (one row per logged or evaluated step, fixed columns) and TensorBoard when installed."""

    def __init__(self, out: Path, columns: list[str], resume_step: int | None, enabled: bool) -> None:
        self.path, self.columns, self.enabled, self.tb = out / "metrics.csv", ["step", *columns], enabled, None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():  # drop rows logged after the checkpoint
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        else:
            rows = []
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=(resume_step or 0) + 1 if resume_step else None)
        except ImportError:  # TensorBoard is optional
            pass

    def write(self, step: int, values: dict) -> None:
        if not self.enabled or not values:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow({"step": step, **values})
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class EnsembleStats:
    """Training-log diagnostics of the pooled target: the mean weight each teacher received per domain
    (every micro-batch), and on logged steps the mean inter-teacher JSD and how often the pooled top-1
    differs from each teacher's."""

    def __init__(self, domains: tuple[str, ...], teachers: list[str]) -> None:
        self.domains, self.teachers = domains, teachers
        self.reset()

    def reset(self) -> None:
        self.wsum = torch.zeros(len(self.domains), len(self.teachers), dtype=torch.float64)
        self.wcount = torch.zeros(len(self.domains), dtype=torch.float64)
        self.differs = torch.zeros(len(self.teachers), dtype=torch.float64)
        self.jsd, self.n = 0.0, 0

    def add_weights(self, domain: torch.Tensor, w: torch.Tensor) -> None:
        """Sums on the weights' device, without a host sync (bincount would need one to size its output)."""
        if self.wsum.device != w.device:
            self.wsum, self.wcount = self.wsum.to(w.device), self.wcount.to(w.device)
        self.wsum.index_add_(0, domain, w.detach().double())
        self.wcount.index_add_(0, domain, torch.ones(domain.shape, dtype=torch.float64, device=domain.device))

    def add_disagreement(self, pooled, dists: list) -> None:
        top = ensemble.top1(pooled)
        self.differs += torch.stack([(ensemble.top1(d) != top).double().mean() for d in dists]).cpu()
        self.jsd += float(ensemble.mean_pairwise_jsd(dists).mean())
        self.n += 1

    def state_dict(self) -> dict:
        return {"wsum": self.wsum.cpu(), "wcount": self.wcount.cpu(), "differs": self.differs, "jsd": self.jsd, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)

    def columns(self) -> list[str]:
        return ([f"weight/{d}/{t}" for d in self.domains for t in self.teachers]
                + [f"top1_differs/{t}" for t in self.teachers] + ["teacher_jsd"])

    def row(self) -> dict:
        wsum, wcount = self.wsum.cpu(), self.wcount.cpu()
        mean_w = wsum / wcount.clamp_min(1)[:, None]
        out = {f"weight/{d}/{t}": float(mean_w[i, j]) for i, d in enumerate(self.domains)
               for j, t in enumerate(self.teachers) if wcount[i] > 0}
        if self.n:
            out.update({f"top1_differs/{t}": float(self.differs[j] / self.n) for j, t in enumerate(self.teachers)})
            out["teacher_jsd"] = self.jsd / self.n
        self.reset()
        return out

"""How much of each teacher reaches its target: on a store cached by `benchmarks/real.py`, the held-out gold
statistic (the teacher's own chained probability of the gold text) against the probability its stored target
gives the gold store id, where that id is in the target's top-k.

    python benchmarks/real_reach.py --store /tmp/chorus-real/store.zarr
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from _common import table, write

from chorus.distill.sparse import gold_log_prob
from chorus.distill.targets import TargetBuilder
from chorus.store import Store, check_teachers, complete_teachers
from chorus.student.data import CachedRows, positions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="/tmp/chorus-real/store.zarr")
    args = ap.parse_args()
    store = Store.open(args.store, "r")
    m, names = store.manifest, complete_teachers(store)
    builder = TargetBuilder(check_teachers(store, names), m.tokenizer.vocab_size, calibrated=False)
    data = CachedRows(args.store, batch_size=16, teachers=names, split="valid", shuffle=False, epochs=1,
                      max_rows=None, stratify=False, rank=0, world_size=1, storage_options=None)
    stat, target, in_top = ({t: [] for t in names} for _ in range(3))
    doms = []
    for batch in data:
        pos = positions(batch)
        keep = pos.gold != -100
        gold = pos.gold[keep]
        for i, t in enumerate(names):
            d = builder.teacher(i, batch["teachers"][t], pos.select).rows(keep)
            stat[t].append(gold_log_prob(d, gold))
            target[t].append(gold_log_prob(dataclasses.replace(d, gold_logp=None), gold))
            in_top[t].append(((d.ids == gold[:, None]) & torch.isfinite(d.logp)).any(-1))
        doms.append(pos.domain[keep])
    domain = torch.cat(doms)
    out, rows = {}, []
    for t in names:
        s, q, top = torch.cat(stat[t]), torch.cat(target[t]), torch.cat(in_top[t])
        for di, dn in enumerate(m.domains):
            k = (domain == di) & top
            gap = s[k] - q[k]
            r = {"gold_in_topk": float(top[domain == di].float().mean()), "stat_prob": float(s[k].exp().mean()),
                 "target_prob": float(q[k].exp().mean()), "gap_nats": float(gap.mean()),
                 "share_gap_over_0.01": float((gap.abs() > 0.01).float().mean()), "positions": int(k.sum())}
            out.setdefault(t, {})[dn] = r
            rows.append([t, dn, f"{100 * r['gold_in_topk']:.1f}%", f"{r['stat_prob']:.3f}", f"{r['target_prob']:.3f}",
                         f"{r['gap_nats']:.4f}", f"{100 * r['share_gap_over_0.01']:.1f}%"])
    print(table(["teacher", "domain", "gold in top-k", "P stat", "P target", "gap (nats)", "gap > 0.01"], rows))
    write("real_reach", {"store_rows": m.num_rows, "teachers": out})


if __name__ == "__main__":
    main()

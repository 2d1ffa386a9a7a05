import sys, numpy as np, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from models.card import load_model
model, card = load_model(sys.argv[1] if len(sys.argv) > 1 else None); card.thresholds.setdefault("fine", 0.6064)
D = torch.load("/tmp/diag_pooled.pt", weights_only=False)
G, QH, QL, truth = D["G"], D["QH"], D["QL"], np.asarray(D["truth"])
with torch.inference_mode():
    S512 = (model.reduction(QH) @ model.reduction(G).T).numpy()
    S128 = (model.adapter2(QL) @ model.adapter1(G).T).numpy()
pos = truth >= 0
rng = np.random.default_rng(0); cal = rng.random(len(truth)) < 0.5
exok = np.zeros(len(truth), bool); exok[pos] = S512[pos].argmax(1) == truth[pos]
tc = np.full(len(truth), np.nan); tc[pos] = S128[np.where(pos)[0], truth[pos]]
fine = card.thresholds["fine"]
top512 = S512.max(1)
for name, sel in [("any", exok), ("flagged", exok & (top512 >= fine))]:
    for rule in ["q005-0.02", "min-0.02", "min-0.05", "min-0.10"]:
        c = tc[cal & sel]
        thr = np.quantile(c, 0.005) - 0.02 if rule.startswith("q") else c.min() - float(rule.split("-")[1])
        t = ~cal
        lost = ((tc < thr) & sel & t).sum(); n = (sel & t).sum()
        negsurv = (S128[t & ~pos].max(1) >= thr).mean()
        possurv = (S128[t & pos].max(1) >= thr).mean()
        print(f"{name:8s} {rule:10s} thr {thr:.3f} lost {lost}/{n} ({100*lost/n:.2f} pt)  neg-surv {negsurv:.2f}")
print("exh r1", exok[pos].mean(), "flag-able", (exok & (top512>=fine))[pos].mean())

import sys, numpy as np, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "docs" / "experiments"))
from models.card import load_model
torch.set_num_threads(1)
model, card = load_model(None)
C = torch.load("models/default/checkpoints/pooled_cache.pt", weights_only=True)
H = C["high"][:1500]
D = torch.load("/tmp/diag_pooled.pt", weights_only=False)
G, QH, QL, truth = D["G"], D["QH"], D["QL"], np.asarray(D["truth"])
pos = truth >= 0
with torch.inference_mode():
    g5, q5, b5 = model.reduction(G), model.reduction(QH), model.reduction(H)
    g1, q1, b1 = model.adapter1(G), model.adapter2(QL), model.adapter1(H)
S512 = (q5 @ g5.T).numpy(); S128 = (q1 @ g1.T).numpy()
B512 = (q5 @ b5.T).numpy(); B128 = (q1 @ b1.T).numpy()
exok = np.zeros(len(truth), bool); exok[pos] = S512[pos].argmax(1) == truth[pos]
def stats(name, S):
    ts = S[np.where(pos)[0], truth[pos]][exok[pos]]
    nb = S[~pos].max(1)
    r1 = (S[pos].argmax(1) == truth[pos]).mean()
    for thr_q in [0.0]:
        thr = ts.min() - 0.02
    print(f"{name:22s} r1 {r1:.3f} true min/p1/p5/p50 {ts.min():.3f}/{np.quantile(ts,.01):.3f}/{np.quantile(ts,.05):.3f}/{np.median(ts):.3f} "
          f"neg p50/p95/max {np.median(nb):.3f}/{np.quantile(nb,.95):.3f}/{nb.max():.3f} surv@min-.02 {(nb>=thr).mean():.2f} surv@p1 {(nb>=np.quantile(ts,.01)).mean():.2f}")
stats("128 raw", S128); stats("512 raw", S512)
for k in [1, 5, 10, 20]:
    for beta in [1.0, 0.5]:
        b = np.sort(B128, 1)[:, -k:].mean(1, keepdims=True)
        stats(f"128 norm k{k} b{beta}", S128 - beta * b)
        b5_ = np.sort(B512, 1)[:, -k:].mean(1, keepdims=True)
        stats(f"512 norm k{k} b{beta}", S512 - beta * b5_)

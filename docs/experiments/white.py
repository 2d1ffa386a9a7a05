import sys, numpy as np, torch, torch.nn.functional as F
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "docs" / "experiments"))
from models.card import load_model
from diag import report
torch.set_num_threads(1)
from diag import load_inputs
model, H, L, LS, G, QH, QL, truth, ex_ok = load_inputs()
with torch.inference_mode():
    a1H, a2LS = model.adapter1(H), model.adapter2(LS)
    print("mean norm a1(train)", a1H.mean(0).norm().item(), "a2", a2LS.mean(0).norm().item(),
          "512", model.reduction(H).mean(0).norm().item())
    g, q = model.adapter1(G), model.adapter2(QL)
    report("as is", g, q, truth, ex_ok)
    mu = a1H.mean(0)
    report("centered(a1 mean)", g - mu, q - mu, truth, ex_ok)
    # PCA whitening from train a1 outputs (shrinkage)
    X = a1H - mu; cov = X.T @ X / len(X); e, V = torch.linalg.eigh(cov)
    for lam in [0.5, 0.25, 0.0]:
        W = V @ torch.diag((e + e.mean()) ** -0.5 if lam == 0.5 else (e + 1e-6) ** -lam) @ V.T if lam else V @ torch.diag((e + 1e-6) ** -0.5) @ V.T
        report(f"whiten pow {lam}", (g - mu) @ W, (q - mu) @ W, truth, ex_ok)
    r = model.reduction; rH = r(H); mu5 = rH.mean(0)
    report("512 as is", r(G), r(QH), truth, ex_ok)
    report("512 centered", r(G) - mu5, r(QH) - mu5, truth, ex_ok)

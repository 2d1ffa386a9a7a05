"""Scratch: adapter-training experiments on cached pooled features."""
import sys, time, math, copy, numpy as np, torch, torch.nn.functional as F
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "docs" / "experiments"))
from models.card import load_model
from models.descriptor import info_nce, koleo_entropy, CompressAdapter, SpindleAdapter
from diag import report
torch.manual_seed(0); torch.set_num_threads(1)
cache_path = sys.argv[1] if len(sys.argv) > 1 else "models/default/checkpoints/pooled_cache.pt"
from diag import load_inputs
model, H, L, LS, G, QH, QL, truth, ex_ok = load_inputs(cache_path)
N = 1500; V = H.shape[0] // N
print("views", V)

def lr_at(base, step, total, warm):
    return base * (step + 1) / warm if step < warm else 0.5 * base * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

def fit(module, loss_fn, n, epochs, bs, lr=3e-3, wd=1e-4):
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=wd)
    steps = n // bs; g = torch.Generator().manual_seed(0)
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g); tot = 0
        for i in range(steps):
            for pg in opt.param_groups: pg["lr"] = lr_at(lr, ep * steps + i, epochs * steps, steps)
            loss = loss_fn(perm[i * bs:(i + 1) * bs]); opt.zero_grad(); loss.backward(); opt.step(); tot += loss.item()
    return tot / steps

def a1_variant(kind, epochs=40, bs=64, temp=0.05, ent=3.0, kd=0.0):
    a1 = CompressAdapter(512, 128)
    red = model.reduction
    def loss_fn(idx):
        if kind == "hl":       # current: (high A, low B)
            x, y = H[idx], L[idx]
        else:                  # high view v vs high view v' of the same image
            i = idx % N; v1 = torch.randint(0, V, (len(idx),)); v2 = (v1 + torch.randint(1, V, (len(idx),))) % V
            x, y = H[v1 * N + i], H[v2 * N + i]
        a, b = a1(x), a1(y)
        loss = info_nce(a, b, temp)
        if ent: loss = loss + ent * 0.5 * (koleo_entropy(a) + koleo_entropy(b))
        if kd:
            with torch.no_grad(): t = red(x); St = t @ t.T
            loss = loss + kd * F.mse_loss(a @ a.T, St)
        return loss
    l = fit(a1, loss_fn, H.shape[0], epochs, bs)
    return a1.eval(), l

def a2_variant(a1, kind="same", epochs=40, bs=256, ctr=0.0, temp=0.05, wd=1e-4, lr=3e-3):
    a2 = SpindleAdapter(512, 1024, 128)
    with torch.no_grad(): T = a1(H)
    def loss_fn(idx):
        if kind == "same":
            x, t = LS[idx], T[idx]
        else:   # low of view B -> target a1(high A)
            x, t = L[idx], T[idx]
        o = a2(x)
        loss = 1 - (o * t).sum(1).mean()
        if ctr: loss = loss + ctr * F.cross_entropy(o @ t.T / temp, torch.arange(len(idx)))
        return loss
    l = fit(a2, loss_fn, H.shape[0], epochs, bs, lr=lr, wd=wd)
    return a2.eval(), l

def show(name, a1, a2):
    with torch.inference_mode():
        report(name + " a1hi", a1(G), a1(QH), truth, ex_ok)
        report(name + " a2lo", a1(G), a2(QL), truth, ex_ok)

if __name__ == "__main__":
    exps = sys.argv[2].split(",") if len(sys.argv) > 2 else ["base"]
    with torch.inference_mode(): report("shipped a2lo", model.adapter1(G), model.adapter2(QL), truth, ex_ok)
    for e in exps:
        t = time.time()
        if e == "base": a1, l1 = a1_variant("hl")
        elif e == "hh": a1, l1 = a1_variant("hh")
        elif e == "bs512": a1, l1 = a1_variant("hl", bs=512, epochs=80)
        elif e == "hh512": a1, l1 = a1_variant("hh", bs=512, epochs=80)
        elif e == "kd": a1, l1 = a1_variant("hl", kd=10.0)
        elif e == "t10": a1, l1 = a1_variant("hl", temp=0.1)
        elif e == "noent": a1, l1 = a1_variant("hl", ent=0.0)
        a2, l2 = a2_variant(a1)
        print(f"-- {e}: a1 loss {l1:.3f} a2 loss {l2:.3f} ({time.time()-t:.0f}s)")
        show(e, a1, a2)

def a2_exps(names, cache_tag=""):
    a1, l1 = a1_variant("hh")
    with torch.inference_mode(): report("hh a1hi", a1(G), a1(QH), truth, ex_ok)
    for e in names:
        t = time.time()
        if e == "same": a2, l = a2_variant(a1)
        elif e == "cross": a2, l = a2_variant(a1, kind="cross")
        elif e == "ctr02": a2, l = a2_variant(a1, ctr=0.2)
        elif e == "ctr1": a2, l = a2_variant(a1, ctr=1.0)
        elif e == "long": a2, l = a2_variant(a1, epochs=120)
        elif e == "wd": a2, l = a2_variant(a1, wd=0.05)
        print(f"-- a2 {e}: loss {l:.3f} ({time.time()-t:.0f}s)")
        with torch.inference_mode(): report("a2 " + e, a1(G), a2(QL), truth, ex_ok)
    return a1

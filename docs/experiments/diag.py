"""Scratch: coarse-stage diagnostics on the coco256 built benchmark (dev set)."""
import sys, time, numpy as np, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
from pathlib import Path
sys.path.insert(0, str(ROOT))
from pipeline.evaluate import built_benchmark
from pipeline.decode import DecodeConfig, Decoder
from models.card import load_model, to_batch

def pooled_set(model_dir, qpi=4, out="/tmp/diagq", low_res=None):
    bench = built_benchmark("../shared/data/coco256", Path(out), 0, queries_per_image=qpi)
    model, card = load_model(model_dir)
    c = card.config
    lr = low_res or c.low_res
    dec = Decoder(DecodeConfig(low_res=lr, high_res=c.high_res))
    def pool(paths, key):
        arr = np.stack([dec.decode_one(p.read_bytes())[key] for p in paths])
        with torch.inference_mode():
            return torch.cat([model.pooled(to_batch(arr[i:i+64])) for i in range(0, len(arr), 64)])
    gids = sorted(bench.gallery); qids = sorted(bench.queries)
    G = pool([bench.gallery[g] for g in gids], "high")
    QH = pool([bench.queries[q] for q in qids], "high")
    QL = pool([bench.queries[q] for q in qids], "low")
    truth = np.array([gids.index(bench.gt[q]) if q in bench.gt else -1 for q in qids])
    return dict(G=G, QH=QH, QL=QL, truth=truth, model=model)

def report(name, g, q, truth, ex_ok):
    g = torch.nn.functional.normalize(g, dim=1); q = torch.nn.functional.normalize(q, dim=1)
    S = (q @ g.T).numpy()
    pos = truth >= 0
    ts = S[np.where(pos)[0], truth[pos]]
    best_neg = S[~pos].max(1)
    r1 = (S[pos].argmax(1) == truth[pos]).mean()
    tsx = ts[ex_ok[pos]]
    thr = np.quantile(tsx, 0.005) - 0.02
    # positives lost (exh-correct but coarse below thr), negatives surviving
    lost = (tsx < thr).mean()
    surv = (best_neg >= thr).mean()
    # best "other" score for positive queries
    Sp = S[pos].copy(); Sp[np.arange(pos.sum()), truth[pos]] = -9
    print(f"{name:28s} r1 {r1:.3f} true p1/p5/p50 {np.quantile(tsx,.01):.3f}/{np.quantile(tsx,.05):.3f}/{np.median(tsx):.3f} "
          f"neg-best p50/p95 {np.median(best_neg):.3f}/{np.quantile(best_neg,.95):.3f}  thr {thr:.3f} neg-surv {surv:.2f} "
          f"d'={(np.median(tsx)-np.median(best_neg))/ (tsx.std()+best_neg.std()):.2f}")
    return S

def full(d, m):
    G, QH, QL, truth = d["G"], d["QH"], d["QL"], d["truth"]
    with torch.inference_mode():
        S512 = (m.reduction(QH) @ m.reduction(G).T).numpy()
        pos = truth >= 0
        ex_ok = np.zeros(len(truth), bool); ex_ok[pos] = S512[pos].argmax(1) == truth[pos]
        print(f"exhaustive512 r1 {ex_ok[pos].mean():.3f}  n_pos {pos.sum()} n_neg {(~pos).sum()} gallery {len(G)}")
        report("512 (hi q)", m.reduction(G), m.reduction(QH), truth, ex_ok)
        report("a1(hi q) vs a1", m.adapter1(G), m.adapter1(QH), truth, ex_ok)
        report("a1(lo q) vs a1", m.adapter1(G), m.adapter1(QL), truth, ex_ok)
        report("a2(lo q) vs a1", m.adapter1(G), m.adapter2(QL), truth, ex_ok)
    return ex_ok

if __name__ == "__main__":
    md = sys.argv[1] if len(sys.argv) > 1 else None
    t = time.time(); d = pooled_set(md); print("pooled in", round(time.time()-t), "s")
    torch.save({k: v for k, v in d.items() if k != "model"}, "/tmp/diag_pooled.pt")
    full(d, d["model"])


def load_inputs(cache_path="models/default/checkpoints/pooled_cache.pt"):
    """(model, training cache H/L/LS, dev pooled G/QH/QL, truth, exhaustive-correct mask)."""
    from models.card import load_model
    model, _ = load_model(None)
    C = torch.load(cache_path, weights_only=True)
    D = torch.load("/tmp/diag_pooled.pt", weights_only=False)
    G, QH, QL, truth = D["G"], D["QH"], D["QL"], np.asarray(D["truth"])
    with torch.inference_mode():
        S512 = (model.reduction(QH) @ model.reduction(G).T).numpy()
    pos = truth >= 0
    ex_ok = np.zeros(len(truth), bool); ex_ok[pos] = S512[pos].argmax(1) == truth[pos]
    return model, C["high"], C["low"], C["low_same"], G, QH, QL, truth, ex_ok

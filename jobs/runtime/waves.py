"""One waves run: near-duplicate clusters among a committed partition's own uploads, with Ray.

:func:`prepare_waves` checks everything before Ray starts (the partition, its committed flags and
signatures, the model) and sizes the sure threshold for the partition. :func:`execute_waves`:

1. the partition's stored 128-d features in one faiss index; Ray Data actors search it top-k for
   every upload (:class:`~pipeline.moderation.waves.NeighbourSearch`);
2. uploads with a candidate are read again and described at high resolution by Ray Data actors
   (:class:`~pipeline.moderation.waves.NodeDescriber`); pairs get their normalised fine score;
3. identical bytes and sure pairs join clusters; the pairs in the verification zone that would join
   two clusters are verified by Ray Data actors (:class:`~pipeline.moderation.waves.EdgeVerifier`);
4. clusters, ranks and waves (:func:`~pipeline.moderation.wave_output.assign`), one row per upload
   committed atomically under ``OUTPUT/_waves/`` (:func:`~pipeline.moderation.wave_output.commit_waves`),
   and the run's review page re-written with its Waves section.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from jobs.runtime.job_config import JobConfig
from pipeline.errors import ModscanError
from pipeline.ingest.storage import Store, open_store, redact
from pipeline.moderation import flags as F
from pipeline.moderation import wave_output as O
from pipeline.moderation import waves as W
from pipeline.moderation.signatures import model_versions, signatures_root


@dataclass
class WavesPlan:
    """What :func:`prepare_waves` checked and decided."""

    part: str
    run_id: str
    out: Store
    sig: Store
    wstore: Store
    flags_run: dict[str, Any]       # the committed flags partition's _run.json
    flags_run_id: str               # its _SUCCESS: the run that published it
    flag_keys: list[str]
    sigs: O.PartitionSignatures
    params: W.WaveParams            # sure_threshold resolved for the partition's size
    model_dir: str | None
    cfg: JobConfig
    timings: dict[str, float] = field(default_factory=dict)
    verified: dict[str, Any] = field(default_factory=dict)  # zone pairs verified (a, b, fine, inliers), edges before ("base")
    t_start: float = field(default_factory=time.time)


def _flag_keys(out: Store, part: str) -> list[str]:
    files = [out.path(k) for k in out.list(F.partition_key(part), recursive=False) if k.endswith(".parquet")]
    return [k for p in files for k in pq.read_table(p, columns=["image_key"], filesystem=out.fs).column("image_key").to_pylist()]


def _check_partition(out: Store, sig: Store, part: str, model: str) -> None:
    """One line naming what is missing when ``part`` cannot be clustered."""
    day, hour = F.split_partition(part)
    if not F.is_committed(out, part):
        hours = [p for p in F.committed_partitions(out, day) if p != day] if hour is None else []
        if hours:
            raise ModscanError(f"dt={day} is written in hours ({len(hours)} committed): cluster each with "
                               f"`modscan waves --date {day} --hour HH`")
        raise ModscanError(f"{F.partition_key(part)} has no committed flags partition under {redact(out.uri)}: "
                           f"run `modscan moderate` for it first")
    if not F.is_committed(sig, part):
        raise ModscanError(f"{F.partition_key(part)} has no committed signatures under {redact(sig.uri)} "
                           f"([job] write_signatures was off): re-moderate it with --restart")
    other = model_versions(sig, part) - {model}
    if other:
        raise ModscanError(f"{F.partition_key(part)}: signatures were made with model {sorted(other)[0]}, not "
                           f"{model}: pass that model with --model")


def prepare_waves(output_uri: str, part: str, cfg: JobConfig | None = None, model_dir: str | None = None,
                  signatures_uri: str | None = None, waves_uri: str | None = None) -> WavesPlan:
    """Every check before Ray starts; a one-line ModscanError otherwise."""
    from jobs.runtime.run import new_run_id
    from models.card import read_card
    from pipeline.gallery.calibration import ScoreTails

    cfg = cfg or JobConfig()
    part = F.valid_partition(part, "--date/--hour")
    card = read_card(model_dir)
    out = open_store(output_uri)
    sig = open_store(signatures_root(output_uri, signatures_uri))
    _check_partition(out, sig, part, card.version_id)
    t = time.time()
    sigs = O.read_signatures(sig, part)
    params = cfg.wave_params()
    if params.sure_threshold is None:
        sure = W.sure_for_size(ScoreTails.from_dict(card.scale_tails), len(sigs.keys), float(card.thresholds["fine"]),
                               params.false_merge_budget)
        params = replace(params, sure_threshold=round(sure, 4))
    plan = WavesPlan(part, new_run_id(part), out, sig,
                     open_store(O.waves_root(output_uri, waves_uri), create=True), F.read_run(out, part) or {},
                     out.read_text(f"{F.partition_key(part)}/{F.SUCCESS}").strip(), _flag_keys(out, part), sigs,
                     params, model_dir, cfg)
    plan.timings["read"] = time.time() - t
    return plan


def candidate_pairs(plan: WavesPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k neighbours of every searched upload at the coarse threshold, by Ray Data actors."""
    import ray

    n = len(plan.sigs.keys)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    import faiss

    t = time.time()
    index_bytes = faiss.serialize_index(W.feature_index(plan.sigs.x))
    plan.timings["index"] = time.time() - t
    t = time.time()
    ds = ray.data.range(n, override_num_blocks=max(1, min(64, n // 2048 or 1)))
    ds = ds.map_batches(W.NeighbourSearch, fn_constructor_kwargs={"index_bytes": index_bytes, "k": plan.params.k,
                                                                  "threshold": plan.params.coarse_threshold},
                        batch_size=4096, batch_format="numpy", num_cpus=0.5,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, plan.cfg.actors or 2)))
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    cat = lambda c, dt: np.concatenate([p[c] for p in parts]).astype(dt) if parts else np.zeros(0, dt)
    a, b, s = W.unique_pairs(cat("a", np.int64), cat("b", np.int64), cat("coarse", np.float32))
    plan.timings["search"] = time.time() - t
    return a, b, s


def describe_nodes(plan: WavesPlan, nodes: np.ndarray) -> dict[str, Any]:
    """The uploads ``nodes`` read again and described (512-d, background term, upload time)."""
    import ray

    from jobs.runtime.ray_stages import actor_resources

    n, dim = len(plan.sigs.keys), 512
    got: dict[str, Any] = {"ok": np.zeros(n, bool), "fine": np.zeros((n, dim), np.float32), "bg": np.zeros(n, np.float32),
           "uploaded_at": np.full(n, np.nan), "errors": {}}
    if not len(nodes):
        return got
    t = time.time()
    res = actor_resources(plan.cfg)
    items = [{"node": int(i), "image_uri": str(plan.sigs.uris[int(i)])} for i in nodes]
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=max(1, min(200, -(-len(items) // plan.cfg.batch_size))))
    ds = ds.map_batches(W.NodeDescriber, fn_constructor_kwargs={"model_dir": plan.model_dir, "threads": res.torch_threads,
                                                                "precision": plan.cfg.precision, "decode": plan.cfg.decode},
                        batch_size=plan.cfg.batch_size, batch_format="numpy", num_cpus=res.num_cpus,
                        num_gpus=res.num_gpus or None, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=res.actors))
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows = np.asarray(b["node"], np.int64)
        got["ok"][rows], got["bg"][rows], got["uploaded_at"][rows] = b["ok"], b["bg"], b["uploaded_at"]
        got["fine"][rows] = np.asarray(b["fine"], np.float32).reshape(len(rows), -1)
        for r, e in zip(rows, b["error"]):
            if isinstance(e, str) and e:
                got["errors"][int(r)] = e
    plan.timings["describe"] = time.time() - t
    return got


def verify_pairs(plan: WavesPlan, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RANSAC inliers of the pairs ``a``-``b`` (sorted by ``a``), by Ray Data actors."""
    import ray

    if not len(a):
        return np.zeros(0, np.int32)
    t = time.time()
    u = plan.sigs.uris
    items = [{"a": int(i), "b": int(j), "uri_a": str(u[int(i)]), "uri_b": str(u[int(j)])} for i, j in zip(a, b)]
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=max(1, min(64, len(items) // 32 or 1)))
    ds = ds.map_batches(W.EdgeVerifier, batch_size=32, batch_format="numpy", num_cpus=0.5,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, plan.cfg.actors or 2)))
    inliers = {}
    for bt in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, j, n in zip(bt["a"], bt["b"], bt["inliers"]):
            inliers[(int(i), int(j))] = int(n)
    plan.timings["verify"] = time.time() - t
    return np.asarray([inliers[(int(i), int(j))] for i, j in zip(a, b)], np.int32)


def find_edges(plan: WavesPlan) -> tuple[list[O.Edge], dict[str, Any], dict[str, int]]:
    """Candidates, fine scores, then verification of the zone pairs that would join two clusters.
    -> (accepted edges, the described nodes, counts)."""
    p = plan.params
    a, b, coarse = candidate_pairs(plan)
    same = W.same_bytes_pairs(plan.sigs.sha256)
    nodes = np.unique(np.concatenate([a, b, np.asarray([r for pr in same for r in pr], np.int64)]))
    got = describe_nodes(plan, nodes)
    ok = got["ok"][a] & got["ok"][b]
    a, b, coarse = a[ok], b[ok], coarse[ok]
    fine = W.pair_scores(got["fine"], got["bg"], a, b)
    edges = [O.Edge(i, j, None, W.SAME_BYTES) for i, j in same]
    assert p.sure_threshold is not None  # prepare_waves sized it for the partition
    sure = fine >= float(p.sure_threshold)
    edges += [O.Edge(int(i), int(j), float(s), W.SURE) for i, j, s in zip(a[sure], b[sure], fine[sure])]
    uf = W.UnionFind(len(plan.sigs.keys))
    for e in edges:
        uf.union(e.a, e.b)
    zone = ~sure & (fine >= p.fine_threshold)
    joins = np.asarray([uf.find(int(i)) != uf.find(int(j)) for i, j in zip(a[zone], b[zone])], bool)
    za, zb, zf = a[zone][joins], b[zone][joins], fine[zone][joins]
    inliers = verify_pairs(plan, za, zb)
    plan.verified = {"a": za, "b": zb, "fine": zf, "inliers": inliers, "base": [(e.a, e.b) for e in edges]}
    good = inliers >= p.min_inliers
    edges += [O.Edge(int(i), int(j), float(s), W.VERIFIED) for i, j, s in zip(za[good], zb[good], zf[good])]
    counts = {"searched": len(plan.sigs.keys), "candidate_pairs": int(len(ok)), "same_bytes_pairs": len(same),
              "described": int(len(nodes)), "reread_failed": len(got["errors"]), "sure_edges": int(sure.sum()),
              "zone_pairs": int(zone.sum()), "verified_pairs": int(len(za)), "verified_edges": int(good.sum())}
    return edges, got, counts


def execute_waves(plan: WavesPlan, ray_address: str | None = None, review: bool = True) -> dict[str, Any]:
    """Find the edges with Ray, cluster, commit one row per upload; re-write the review page."""
    from jobs.runtime.ray_stages import init_ray, raise_worker_error

    init_ray(ray_address)
    try:
        edges, got, counts = find_edges(plan)
    except Exception as e:
        raise_worker_error(e)
    t = time.time()
    times = {i: float(got["uploaded_at"][i]) for i in range(len(plan.sigs.keys)) if not np.isnan(got["uploaded_at"][i])}
    clusters = O.assign(plan.part, plan.sigs.keys, edges, times)
    table = O.wave_table(plan.part, plan.flag_keys, plan.sigs, clusters, times, set(got["errors"]),
                         plan.params.wave_min_size, plan.run_id, plan.flags_run_id)
    plan.timings["cluster"] = time.time() - t
    info = _info(plan, table, counts, got["errors"])
    t = time.time()
    info["partition_uri"] = O.commit_waves(plan.wstore, plan.part, plan.run_id, table, set(plan.flag_keys), info)
    plan.timings["commit"] = time.time() - t
    page = f"_reviews/{F.partition_key(plan.part)}/review-{plan.flags_run.get('run_id')}.html"
    if review and plan.out.exists(page):  # the moderation run's page: re-written with its Waves section
        info["review"] = _rewrite_review(plan)
    return info


def _info(plan: WavesPlan, table: Any, counts: dict[str, int], errors: dict[int, str]) -> dict[str, Any]:
    """The waves partition's ``_run.json``."""
    df = table.select(["dup_cluster_id", "dup_cluster_size", "wave"]).to_pandas()
    sizes = df.drop_duplicates("dup_cluster_id")["dup_cluster_size"]
    waves = df[df["wave"]].drop_duplicates("dup_cluster_id")
    day, hour = F.split_partition(plan.part)
    return {"kind": "waves", "run_id": plan.run_id, "dt": day, "hour": hour, "partition": F.partition_key(plan.part),
            "flags_run_id": plan.flags_run_id, "model_version": plan.flags_run.get("model_version"),
            "params": plan.params.to_dict(), "uploads": len(plan.flag_keys), **counts,
            "clusters": int(len(sizes)), "clusters_of_2_or_more": int((sizes > 1).sum()),
            "uploads_in_clusters_of_2_or_more": int(sizes[sizes > 1].sum()), "waves": int(len(waves)),
            "uploads_in_waves": int(df["wave"].sum()),
            "reread_errors": {plan.sigs.keys[i]: e for i, e in sorted(errors.items())[:20]},
            "seconds": {k: round(v, 3) for k, v in plan.timings.items()},
            "wall_seconds": round(time.time() - plan.t_start, 3),
            "finished_at": _dt.datetime.now(_dt.UTC).isoformat()}


def _rewrite_review(plan: WavesPlan) -> str | None:
    """The flags run's review page again, now with its Waves section (best effort: the waves are committed)."""
    from pipeline.errors import plain_message
    from pipeline.ops.review_page import write_review

    r = plan.flags_run
    try:
        return write_review(plan.out, plan.part, r["run_id"], r["input"], r["gallery"],
                            max_rows=plan.cfg.review_max_rows, gallery_version=r.get("gallery_version"))
    except Exception as e:
        return f"not re-written: {redact(plain_message(e))}"


def waves(output_uri: str, part: str, cfg: JobConfig | None = None, model_dir: str | None = None,
          signatures_uri: str | None = None, waves_uri: str | None = None, ray_address: str | None = None,
          review: bool = True) -> dict[str, Any]:
    """:func:`prepare_waves` then :func:`execute_waves`; returns the waves partition's ``_run.json``."""
    plan = prepare_waves(output_uri, part, cfg, model_dir, signatures_uri, waves_uri)
    return execute_waves(plan, ray_address, review)


def summary_lines(info: dict[str, Any]) -> str:
    """What ``modscan waves`` prints."""
    p = info["params"]
    return "\n".join([
        f"modscan waves {info['partition']} run={info['run_id']} (flags run {info['flags_run_id']})",
        f"  {info['uploads']} uploads, {info['searched']} searched; {info['candidate_pairs']} candidate pairs "
        f"(k={p['k']}, coarse >= {p['coarse_threshold']}), {info['described']} re-read, "
        f"{info['sure_edges']} sure (fine >= {p['sure_threshold']}), {info['verified_edges']} of "
        f"{info['verified_pairs']} verified (fine >= {p['fine_threshold']}), {info['same_bytes_pairs']} identical",
        f"  {info['clusters_of_2_or_more']} clusters of 2+ uploads ({info['uploads_in_clusters_of_2_or_more']} uploads); "
        f"{info['waves']} waves of {p['wave_min_size']}+ ({info['uploads_in_waves']} uploads) in {info['wall_seconds']:.1f}s",
        f"  committed: {info['partition_uri']}" + (f"; review page: {info['review']}" if info.get("review") else ""),
    ])

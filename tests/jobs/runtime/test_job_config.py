"""jobs/runtime/job_config.py: the shipped job config loads; every problem of a bad one is reported as
FILE:LINE: message; the query overrides the job and ``lookup`` share."""

from __future__ import annotations

import textwrap

import pytest
from conftest import ROOT

from jobs.runtime.job_config import JobConfig, JobConfigError
from pipeline.errors import UsageError
from pipeline.ingest.decode import DecodeConfig


def _write(tmp_path, text: str, name: str = "job.toml") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(p)


def _errors(path: str, **overrides) -> list[str]:
    with pytest.raises(JobConfigError) as e:
        JobConfig.from_toml(path, **overrides)
    assert e.value.exit_code == 2
    lines = str(e.value).splitlines()
    assert lines[0] == f"{len(e.value.errors)} error(s) in job config:"
    return lines[1:]


def test_the_shipped_job_config_loads_and_states_the_defaults() -> None:
    cfg = JobConfig.from_toml(str(ROOT / "configs" / "moderate.toml"))
    # the reference file documents the defaults: loading it changes nothing
    assert cfg == JobConfig()
    assert cfg.decode == DecodeConfig(max_bytes=50 * 1024 * 1024, max_pixels=64_000_000, min_side=16)
    over = JobConfig.from_toml(str(ROOT / "configs" / "moderate.toml"), batch_size=8, actors=None)
    assert over.batch_size == 8 and over.actors == 0  # a flag given wins; None means "not given"


def test_bad_job_keys_and_values_are_reported_at_their_lines(tmp_path) -> None:
    path = _write(tmp_path, """
        # ops config
        [job]
        batch_size = 0
        actors = "2"
        torch_thread = 2
        single_stage = true
        allowed_input_prefixes = [
            "relative/dir",
        ]
        coarse_threshold = 3.0
        precision = "fp16"
        verify_gallery = "yes"
        test_fail_keys = ["a.jpg"]

        [jobs]
        batch_size = 8
        """)
    known = ("(known: actor_num_cpus, actors, allow_empty_input, allowed_input_prefixes, batch_size, chunk_size, "
             "coarse_ef_search, coarse_nprobe, coarse_threshold, decode_num_cpus, fine_threshold, gallery_cache, "
             "gallery_cache_dir, gallery_shard_servers, image_extensions_only, max_matches_per_reference, "
             "metrics_pushgateway, metrics_textfile, precision, rerank_k, retro_days, review_max_rows, sure_threshold, "
             "torch_threads, verify_gallery, wave_coarse_threshold, wave_fine_threshold, wave_k, wave_min_inliers, "
             "wave_min_size, wave_sure_threshold, waves, write_signatures, [job.decode])")
    assert _errors(path) == [
        f"{path}:3: [job] batch_size must be an integer >= 1, got 0",
        f"{path}:4: [job] actors must be an integer >= 0, got '2'",
        f"{path}:5: [job] unknown key 'torch_thread' {known}",
        f"{path}:6: [job] single_stage was removed: the single-stage baseline is benchmark-only "
        "(`modscan bench pipeline` runs it)",
        f"{path}:7: [job] allowed input prefix 'relative/dir' must be an absolute path or an s3:// URI",
        f"{path}:10: [job] coarse_threshold must be a cosine in [-1, 1], got 3.0",
        f"{path}:11: [job] precision must be auto, bf16 or fp32, got 'fp16'",
        f"{path}:12: [job] verify_gallery must be true or false, got 'yes'",
        f"{path}:13: [job] unknown key 'test_fail_keys' {known}",
        f"{path}:15: unknown top-level key 'jobs' (expected a [job] table)",
    ]


def test_bad_decode_keys_and_the_model_sizes_are_reported_at_their_lines(tmp_path) -> None:
    path = _write(tmp_path, """
        [job]
        batch_size = 16

        [job.decode]
        max_pixel = 5
        min_side = 0
        max_bytes = 1.5
        low_res = 128
        high_res = 224
        """)
    sizes = "cannot be set: the decode sizes come from the model card (the sizes the model was trained at; " \
            "`modscan card` shows them)"
    assert _errors(path) == [
        f"{path}:5: [job.decode] unknown key 'max_pixel' (known: max_bytes, max_pixels, min_side)",
        f"{path}:6: [job.decode] min_side must be an integer >= 1, got 0",
        f"{path}:7: [job.decode] max_bytes must be an integer >= 1, got 1.5",
        f"{path}:8: [job.decode] low_res {sizes}",
        f"{path}:9: [job.decode] high_res {sizes}",
    ]
    # dotted keys and an inline table are located too
    path = _write(tmp_path, """
        [job]
        decode.high_res = 224
        batch_size = 8
        """, "dotted.toml")
    assert _errors(path) == [f"{path}:2: [job.decode] high_res {sizes}"]
    path = _write(tmp_path, """
        [job]
        batch_size = 8
        decode = { max_pixels = "big" }
        """, "inline.toml")
    assert _errors(path) == [f"{path}:3: [job.decode] max_pixels must be an integer >= 1, got 'big'"]
    path = _write(tmp_path, "[job]\ndecode = 5\n", "scalar.toml")
    assert _errors(path) == [f"{path}:2: [job] decode must be a [job.decode] table, got 5"]


def test_syntax_errors_and_a_missing_file(tmp_path) -> None:
    path = _write(tmp_path, """
        [job]
        batch_size = 8
        actors = = 2
        """)
    (msg,) = _errors(path)
    assert msg.startswith(f"{path}:3: TOML syntax: ")
    with pytest.raises(UsageError, match=r"--config .*missing\.toml: no such file"):
        JobConfig.from_toml(str(tmp_path / "missing.toml"))


def test_a_good_file_sets_what_it_says(tmp_path) -> None:
    path = _write(tmp_path, """
        [job]
        batch_size = 8
        torch_threads = 3
        allowed_input_prefixes = ["s3://uploads/"]
        coarse_threshold = 0.6

        [job.decode]
        max_pixels = 1000000
        """)
    cfg = JobConfig.from_toml(path)
    assert (cfg.batch_size, cfg.torch_threads, cfg.allowed_input_prefixes, cfg.coarse_threshold) == (
        8, 3, ("s3://uploads/",), 0.6)
    assert cfg.decode == DecodeConfig(max_pixels=1_000_000) and cfg.threshold_overrides() == {"coarse": 0.6}


def test_query_overrides_carry_the_thresholds_and_the_coarse_search_settings() -> None:
    """The one construction the job's Moderator and ``lookup`` share (``JobConfig.query_overrides``)."""
    from pipeline.gallery import QueryOverrides

    assert JobConfig().query_overrides() == QueryOverrides()
    cfg = JobConfig(coarse_threshold=0.6, rerank_k=50, coarse_nprobe=16, coarse_ef_search=256)
    assert cfg.query_overrides() == QueryOverrides(coarse_threshold=0.6, fine_threshold=None, rerank_k=50, nprobe=16,
                                                   ef_search=256)


def test_toml_key_lines() -> None:
    from pipeline.errors import toml_key_lines

    text = '[job]\n# c\n"batch_size" = 1\ndecode.min_side = 2\n\n[[bank]]\nname = "x"\n[job.decode]\nmax_bytes = 3\n'
    where = toml_key_lines(text)
    assert (where["job"], where["job.batch_size"], where["job.decode"], where["job.decode.min_side"]) == (1, 3, 4, 4)
    assert (where["bank"], where["bank.name"], where["job.decode.max_bytes"]) == (6, 7, 9)
    # each table of an array by its index; a key of a later table never lands on the first one
    where = toml_key_lines('[[bank]]\nname = "a"\n\n[[ bank ]]\n"name" = "b"\nsource.x = 1\n[other]\nkind = 2\n')
    assert (where["bank[0]"], where["bank[0].name"], where["bank[1]"], where["bank[1].name"]) == (1, 2, 4, 5)
    assert (where["bank[1].source"], where["bank[1].source.x"], where["other.kind"]) == (6, 6, 8)
    assert "bank[0].source" not in where and "bank[1].kind" not in where


def test_gallery_shard_servers_is_a_count_and_needs_the_node_cache(tmp_path) -> None:
    assert JobConfig().gallery_shard_servers == 0  # off: every Moderator maps the whole version
    assert JobConfig(gallery_shard_servers=3).gallery_shard_servers == 3
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(UsageError, match=r"\[job\] gallery_shard_servers must be an integer >= 0"):
            JobConfig(gallery_shard_servers=bad)
    with pytest.raises(UsageError, match=r'gallery_shard_servers needs gallery_cache = "node"'):
        JobConfig(gallery_shard_servers=2, gallery_cache="off")
    path = _write(tmp_path, """
        [job]
        gallery_shard_servers = -2
        """)
    assert _errors(path) == [f"{path}:2: [job] gallery_shard_servers must be an integer >= 0, got -2"]

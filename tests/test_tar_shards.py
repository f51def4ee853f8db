"""Reading tar shards (ldm/data/tar_shards.py): reproducible writes, brace patterns counted before they are expanded,
hostile tars (sparse bombs, forged sizes, duplicated members) that cost their sample, not the run or its memory; also
as the latent cache's writer (ldm/data/latent_cache_writer.py) lists them.  The hostile tars are built with the helpers
of test_shard_stream.py."""

from __future__ import annotations

import os

import pytest
from test_shard_stream import forged_header, good_member, sparse_tar_member, write_forged

from ldm.data.tar_shards import iter_samples, read_span, write_tar
from ldm.util import ConfigError

from conftest import write_image_shards


def test_write_tar_is_reproducible_and_records_member_spans(tmp_path):
    members = [("000000-000000.latent.npy", b"x" * 700), ("000000-000000.json", b"{}")]
    for name in ("a.tar", "b.tar"):
        with open(tmp_path / name, "wb") as fh:
            spans = write_tar(fh, members)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    for (_, data), span in zip(members, spans):
        assert read_span(tmp_path / "a.tar", span.offset, span.size) == data
    (sample,) = iter_samples(str(tmp_path / "a.tar"))
    assert sample["__key__"] == "000000-000000" and sample["latent.npy"] == b"x" * 700


def test_brace_patterns_are_counted_before_they_are_expanded(tmp_path):
    """{0..99999999} ran out of memory; {0..9999999} took 74 s and 2.5 GB before its one-line error."""
    import time
    import tracemalloc

    from ldm.data.tar_shards import MAX_SHARDS, count_expansions, expand_shards

    assert [count_expansions(p) for p in ("a.tar", "x-{000..099}.tar", "{a,b}-{0..9..2}::{A..Z}", "{1{2,3}")] == [1, 100, 36, 1]
    tracemalloc.start()
    started = time.monotonic()
    try:
        for pattern in ("x-{0..99999999}.tar", "x-{0..9999999}.tar", "{0..9999}-{0..9999}.tar"):
            with pytest.raises(ConfigError, match=f"more than the {MAX_SHARDS:,} allowed"):
                expand_shards(pattern)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 5 and peak < 10e6
    with pytest.raises(ConfigError, match="expand to 1,000,001 shard names"):
        expand_shards(["a.tar"] * MAX_SHARDS + ["b{0..0}.tar"])
    with pytest.raises(ConfigError, match="nests braces"):
        expand_shards("{" * 500 + "}" * 500)
    with pytest.raises(ValueError, match="Unbalanced braces"):  # braceexpand's own error, as before
        expand_shards(str(tmp_path / "x-{1.tar"))


def test_a_sample_reads_only_the_wanted_members_up_to_a_total(tmp_path, monkeypatch):
    """40 sparse 60 MB members under one key (a 30 KB shard) took 3.3 GB: every member was read whatever its
    extension, and the cap was per member.  Now unwanted members are passed over unread and a sample is capped."""
    import tracemalloc

    from ldm.data import tar_shards
    from ldm.data.tar_shards import IMAGE_EXTS, MAX_SAMPLE_BYTES, SAMPLE_ERROR_KEY, iter_samples

    parts = [good_member("a")] + [sparse_tar_member(f"a.e{i}", 60 << 20) for i in range(40)] + [good_member("b", 1)]
    url = write_forged(tmp_path / "many.tar", *parts)
    assert os.path.getsize(url) < 40 << 10
    tracemalloc.start()
    try:
        samples = list(iter_samples(url, exts=IMAGE_EXTS))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10e6 and [sorted(s) for s in samples] == [["__index__", "__key__", "__url__", "png"]] * 2
    for stream in (url, f"pipe:cat {url}"):  # every member wanted: the sample is refused before it is read whole
        monkeypatch.setattr(tar_shards, "MAX_SAMPLE_BYTES", 100 << 20)
        first = next(iter_samples(stream))
        assert "png" not in first and "e0" not in first
        assert "'a.e1' add up to 125," in first[SAMPLE_ERROR_KEY] and "more than the 104,857,600" in first[SAMPLE_ERROR_KEY]
    assert MAX_SAMPLE_BYTES == 2 * tar_shards.MAX_MEMBER_BYTES


def test_a_bad_member_costs_its_sample_or_says_where_the_shard_breaks(tmp_path):
    """Two adjacent members of one name cost the rest of the shard, with the message '#(samples after position -1)';
    a member claiming 2**62 bytes was an OSError, and over a stream a forward seek that never ended."""
    from ldm.data.latent_cache_writer import Unit, unit_inputs
    from ldm.data.tar_shards import SAMPLE_ERROR_KEY, ShardFormatError, iter_samples

    dup = write_forged(tmp_path / "dup.tar", good_member("a"), good_member("a", 1), good_member("c", 2))
    samples = list(iter_samples(dup))
    assert [s["__key__"] for s in samples] == ["a", "c"] and "png" in samples[1]
    assert "two members named 'a.png' next to each other" in samples[0][SAMPLE_ERROR_KEY]
    huge = write_forged(tmp_path / "huge.tar", good_member("a"), forged_header("b.png", 2**62), good_member("c", 1))
    for url in (huge, f"pipe:cat {huge}"):
        got = []
        with pytest.raises(ShardFormatError, match="'b.png' .* 4,611,686,018,427,387,904 bytes"):
            got.extend(s["__key__"] for s in iter_samples(url))
        assert got == ["a"]  # the sample before the broken header is kept
    skipped: list[dict[str, str]] = []
    keys = [key for _, key, _, _ in unit_inputs(Unit(0, url=huge), skipped)]
    assert keys == ["huge.tar#a"] and [s["source"] for s in skipped] == [
        "huge.tar#(its samples from position 1 on: the shard breaks there)"
    ]
    skipped.clear()
    keys = [key for _, key, _, _ in unit_inputs(Unit(0, url=dup), skipped)]
    assert keys == ["dup.tar#c"] and [s["source"] for s in skipped] == ["dup.tar#a"]


def test_shard_patterns_with_unset_variables_or_huge_ranges_are_one_line_errors(tmp_path, monkeypatch):
    """`--data '${HOME}/x.tar'` ended in webdataset's AssertionError (it reads WDS_HOME); a 5000-digit brace range
    gave Python's int-limit message without naming the pattern."""
    from ldm.data.tar_shards import expand_shards

    monkeypatch.delenv("WDS_HOME", raising=False)
    with pytest.raises(
        ConfigError,
        match=r"uses \$\{HOME\}, which webdataset fills in from the environment variable "
        r"WDS_HOME \(not from HOME\), and WDS_HOME is not set",
    ):
        expand_shards("${HOME}/x.tar")
    pattern = write_image_shards(tmp_path, [1, 1])
    monkeypatch.setenv("WDS_HOME", str(tmp_path))
    assert expand_shards("${HOME}/img-{00..01}.tar") == expand_shards(pattern)
    with pytest.raises(ConfigError, match="has 5,000 digits, more than the 64 allowed") as info:
        expand_shards("x-{0.." + "9" * 5000 + "}.tar")
    assert "shard pattern 'x-{0..999" in str(info.value) and len(str(info.value)) < 400


def test_a_tar_bomb_in_an_input_shard_is_listed_as_unreadable_without_being_read(tmp_path):
    import tracemalloc

    from test_shard_stream import write_bomb_shard

    from ldm.data.latent_cache_writer import Unit, unit_inputs

    shard = tmp_path / "bomb-0.tar"
    write_bomb_shard(shard)
    skipped: list[dict[str, str]] = []
    tracemalloc.start()
    try:
        keys = [key for _, key, _, _ in unit_inputs(Unit(0, url=str(shard)), skipped)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert keys == ["bomb-0.tar#a", "bomb-0.tar#c"] and peak < 50e6
    assert [s["source"] for s in skipped] == ["bomb-0.tar#bomb"] and "'bomb.png' is 2,147,483,648 bytes" in skipped[0]["error"]


def test_a_gzip_compressed_shard_says_so(tmp_path):
    """tarfile's uncompressed mode said only "bad checksum"."""
    import gzip

    from ldm.data.tar_shards import ShardFormatError

    with open(tmp_path / "a.tar", "wb") as fh:
        write_tar(fh, [("000000.json", b"{}")])
    (tmp_path / "b.tar").write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    with pytest.raises(ShardFormatError, match=r"b.tar is gzip-compressed: shards are read uncompressed .*; gunzip it"):
        list(iter_samples(str(tmp_path / "b.tar")))

"""`salt-cache verify` on real stores: intact, damaged byte by byte, and deep re-runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import Build, SsV2Set, call_cli, copy_store

from shared.store import RowStatus


def _chunk_span(shard_file: Path, chunks_per_shard: int, chunk: int) -> tuple[int, int]:
    """(offset, nbytes) of one chunk inside a Zarr v3 shard file (index at the end:
    ``chunks_per_shard`` pairs of little-endian uint64, then a 4-byte crc32c)."""
    index_bytes = chunks_per_shard * 16 + 4
    raw = shard_file.read_bytes()[-index_bytes:-4]
    index = np.frombuffer(raw, dtype="<u8").reshape(chunks_per_shard, 2)
    offset, nbytes = (int(v) for v in index[chunk])
    assert nbytes > 0 and offset + nbytes <= shard_file.stat().st_size - index_bytes
    return offset, nbytes


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _committed_row_with_neighbours(store: Path, shard_rows: int) -> tuple[int, int, int]:
    """A committed row that is not its shard's first: (row, shard, position in shard)."""
    status = zarr.open_group(str(store), mode="r")["status"][:]
    for row in np.flatnonzero(status == RowStatus.COMMITTED):
        shard, position = divmod(int(row), shard_rows)
        if position > 0:
            return int(row), shard, position
    raise AssertionError("no suitable committed row")


def test_verify_reference_store_is_ok(reference_build: Build, mixed_set: SsV2Set) -> None:
    result = call_cli("verify", reference_build.store, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["problems"] == []
    assert report["rows"] == len(mixed_set.clips)
    assert report["failed"] == 3 and report["pending"] == 0
    assert report["committed"] == len(mixed_set.clips) - 3


@pytest.mark.parametrize("array", ["latents", "pixels"])
def test_flipped_byte_names_the_row(reference_build: Build, tmp_path: Path, array: str) -> None:
    store = copy_store(reference_build.store, tmp_path / "latents.zarr")
    group = zarr.open_group(str(store), mode="r")
    shard_rows = group["status"].chunks[0]
    row, shard, position = _committed_row_with_neighbours(store, shard_rows)
    clip_id = str(group["clip_id"][row])
    ndim = group[array].ndim
    shard_file = store / array / "c" / str(shard) / Path(*(["0"] * (ndim - 1)))
    assert shard_file.is_file()
    offset, nbytes = _chunk_span(shard_file, shard_rows, position)
    _flip_byte(shard_file, offset + nbytes // 2)

    result = call_cli("verify", store)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "PROBLEMS" in result.stdout
    assert f"row {row} " in result.stdout
    assert clip_id in result.stdout
    problem_lines = [line for line in result.stdout.splitlines() if "problem:" in line]
    assert len(problem_lines) == 1, problem_lines  # the neighbours in the same shard are fine
    if array == "latents":  # raw fp16: the flip is read back and caught by the checksum
        assert "latents checksum mismatch" in problem_lines[0]

    as_json = call_cli("verify", store, "--json")
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    assert [(p["row"], p["clip_id"]) for p in report["problems"]] == [(row, clip_id)]


def test_pending_rows_are_problems(reference_build: Build, tmp_path: Path) -> None:
    """A shard whose status chunk never landed (killed before its commit) is reported pending."""
    store = copy_store(reference_build.store, tmp_path / "latents.zarr")
    (store / "status" / "c" / "0").unlink()
    result = call_cli("verify", store, "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    shard_rows = zarr.open_group(str(store), mode="r")["status"].chunks[0]
    assert report["pending"] == shard_rows
    assert sorted(p["row"] for p in report["problems"]) == list(range(shard_rows))
    assert all("pending" in p["what"] for p in report["problems"])


def test_damaged_status_chunk_is_reported_not_a_crash(reference_build: Build, tmp_path: Path) -> None:
    store = copy_store(reference_build.store, tmp_path / "latents.zarr")
    (store / "status" / "c" / "1").write_bytes(b"garbage")  # the commit record of shard 1, torn
    shard_rows = zarr.open_group(str(store), mode="r")["status"].chunks[0]
    result = call_cli("verify", store, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert sorted(p["row"] for p in report["problems"]) == list(range(shard_rows, 2 * shard_rows))
    assert all("status unreadable" in p["what"] for p in report["problems"])


def test_failed_row_without_reason_is_a_problem(reference_build: Build, tmp_path: Path) -> None:
    store = copy_store(reference_build.store, tmp_path / "latents.zarr")
    group = zarr.open_group(str(store), mode="r+")
    failed = int(np.flatnonzero(group["status"][:] == RowStatus.FAILED)[0])
    group["error"][failed] = ""
    result = call_cli("verify", store)
    assert result.returncode == 1
    assert f"row {failed} " in result.stdout
    assert "without a recorded reason" in result.stdout


def test_deep_verify_reruns_teacher(reference_build: Build) -> None:
    result = call_cli("verify", reference_build.store, "--deep", "2", "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deep check" in result.stdout
    assert "2 rows" in result.stdout

    as_json = call_cli("verify", reference_build.store, "--deep", "2", "--json", "--device", "cpu")
    assert as_json.returncode == 0
    report = json.loads(as_json.stdout)
    assert report["ok"] is True
    assert len(report["deep"]) == 2
    status = zarr.open_group(str(reference_build.store), mode="r")["status"][:]
    for entry in report["deep"]:
        assert status[entry["row"]] == RowStatus.COMMITTED
        assert entry["relative_l2"] < 1e-3  # fp32 on CPU, fp16 storage only


def test_deep_verify_catches_latents_of_another_teacher(reference_build: Build, tmp_path: Path) -> None:
    """Latents rewritten consistently (checksums fixed up) pass the shallow check but not --deep."""
    from shared.store import row_checksum

    store = copy_store(reference_build.store, tmp_path / "latents.zarr")
    group = zarr.open_group(str(store), mode="r+")
    committed = np.flatnonzero(group["status"][:] == RowStatus.COMMITTED)
    for row in committed:
        fake = (np.asarray(group["latents"][row]).astype(np.float32) * -1.0 + 0.5).astype(np.float16)
        group["latents"][row] = fake
        group["latents_checksum"][row] = np.uint64(row_checksum(fake))
    assert call_cli("verify", store).returncode == 0
    result = call_cli("verify", store, "--deep", "2", "--json", "--device", "cpu")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert len(report["problems"]) == 2
    assert all("teacher re-run differs" in p["what"] for p in report["problems"])


def test_report_is_the_same_for_any_thread_count(demo_reference: Build, tmp_path: Path) -> None:
    """Shards are checked in parallel, but problems come back in row order whatever --threads."""
    store = copy_store(demo_reference.store, tmp_path / "latents.zarr")
    for shard in (1, 4, 7):  # torn latents shards: two unreadable rows each
        path = store / "latents" / "c" / str(shard) / "0" / "0"
        path.write_bytes(path.read_bytes()[:500])
    reports = [json.loads(call_cli("verify", store, "--json", "--threads", str(n)).stdout) for n in (1, 3)]
    rows = [[p["row"] for p in report["problems"]] for report in reports]
    assert rows[0] == [2, 3, 8, 9, 14, 15]
    assert reports[0]["problems"] == reports[1]["problems"]


def test_a_store_of_blake2b_checksums_is_refused_in_one_line(reference_build: Build, tmp_path: Path) -> None:
    """Stores written before crc32c hold blake2b checksums: refused, with how to rebuild, never misread."""
    from shared.store import ATTRS_KEY

    store = copy_store(reference_build.store, tmp_path / "old.zarr")
    group = zarr.open_group(str(store), mode="r+")
    attrs = dict(group.attrs[ATTRS_KEY])
    attrs["checksums"] = {**attrs["checksums"], "algorithm": "blake2b-64 of the row's C-order bytes"}
    group.attrs[ATTRS_KEY] = attrs
    result = call_cli("verify", store)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "blake2b" in lines[0] and "rebuild it" in lines[0], result.stderr

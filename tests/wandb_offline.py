"""Read back what an offline W&B run wrote (``run-*.wandb``), to test what hsae logged.

The file is W&B's header (``:W&B``, magic, version: 7 bytes) followed by LevelDB-log
framed records (32 KiB blocks; each chunk: crc32c (4), length (2, little endian), type
(1: full, 2: first, 3: middle, 4: last)), each record a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block  # block trailer padding
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def read_run(run_dir: Path) -> dict:
    """``{"config": {...}, "summary": {...}, "name", "group", "job_type", "tags", "history_keys",
    "artifacts"}`` of the single offline run under ``run_dir/wandb``."""
    (run_file,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    out: dict = {"config": {}, "summary": {}, "history_keys": set(), "artifacts": []}
    for record in records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out |= {
                "name": record.run.display_name,
                "group": record.run.run_group,
                "job_type": record.run.job_type,
                "tags": list(record.run.tags),
            }
            for item in record.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                out["summary"][key] = json.loads(item.value_json)
        elif kind == "history":
            out["history_keys"] |= {
                item.key or "/".join(item.nested_key) for item in record.history.item
            }
        elif kind == "artifact":
            out["artifacts"].append((record.artifact.type, record.artifact.name))
    return out

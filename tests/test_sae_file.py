"""``sae.safetensors`` is byte-reproducible: the same SAE gives the same file (and sha256).

safetensors' Rust writer keeps the metadata in a hash map seeded at random per map, so the
plain writer puts ``config`` and ``folded_input_scale`` in either order, call to call;
``save_sae`` sorts the header's metadata keys after writing.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from hsae.rundir import sha256_file
from hsae.sae import _sort_metadata, load_sae, make_sae, save_sae

ROOT = Path(__file__).resolve().parents[1]
FILES_PER_PROCESS = 6  # 12 files in all: unsorted, all alike by chance with p = 2**-11

WRITER = """
import sys
from pathlib import Path
import torch
from hsae.sae import make_sae, save_sae
for i in range(int(sys.argv[2])):
    torch.manual_seed(0)
    sae = make_sae("topk", d_model=8, n_latents=16, k=4)
    sample = torch.zeros(4, 8)
    sample[:, 0] = 2.5  # rows of norm 2.5: input_scale 2.5, folded in on save
    sae.set_input_scale(sample)
    save_sae(sae, Path(sys.argv[1]) / str(i))
"""


def header(path: Path) -> dict:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


def test_sae_files_written_in_two_processes_are_byte_identical(tmp_path):
    for name, hash_seed in (("a", "1"), ("b", "2")):
        out = tmp_path / name
        for i in range(FILES_PER_PROCESS):
            (out / str(i)).mkdir(parents=True)
        env = os.environ | {"PYTHONHASHSEED": hash_seed}
        subprocess.run(
            [sys.executable, "-c", WRITER, str(out), str(FILES_PER_PROCESS)],
            cwd=ROOT,
            env=env,
            check=True,
        )
    files = sorted(tmp_path.glob("*/*/sae.safetensors"))
    assert len(files) == 2 * FILES_PER_PROCESS
    assert len({sha256_file(f) for f in files}) == 1
    assert list(header(files[0])["__metadata__"]) == ["config", "folded_input_scale"]
    loaded = load_sae(files[0])
    assert loaded.config()["k"] == 4 and loaded.folded_input_scale == 2.5


def test_plain_writer_orders_metadata_at_random_and_sorting_fixes_it(tmp_path):
    # Many keys, and values with non-ASCII and control characters: the sorted header must fit
    # in the written one's length (escaping) and read back the same.
    tensors = {"W_enc": torch.randn(4, 3), "b": torch.arange(5), "a_half": torch.ones(2).half()}
    metadata = {f"key{i}": f'value {i} é \n\t\x01 "q" \\' for i in range(8)}
    metadata["config"] = json.dumps({"arch": "topk", "k": 4})
    plain = {save(tensors, metadata) for _ in range(10)}
    assert len(plain) > 1  # the bug: one input, different bytes

    written = set()
    for i in range(10):
        path = tmp_path / f"{i}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        size = path.stat().st_size
        _sort_metadata(path)
        assert path.stat().st_size == size
        written.add(path.read_bytes())
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == metadata
        loaded = load_file(str(path))
        assert loaded.keys() == tensors.keys()
        for key, value in tensors.items():
            assert loaded[key].dtype == value.dtype
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert len(written) == 1
    assert list(header(path)["__metadata__"]) == sorted(metadata)


def test_save_sae_in_one_process_writes_the_same_bytes_every_time(tmp_path):
    torch.manual_seed(0)
    sae = make_sae("topk", d_model=8, n_latents=16, k=4)
    digests = set()
    for i in range(10):
        (tmp_path / str(i)).mkdir()
        digests.add(sha256_file(save_sae(sae, tmp_path / str(i))))
    assert len(digests) == 1

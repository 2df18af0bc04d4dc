"""Ground-truth recovery of every SAE architecture on one synthetic hierarchy.

Activations come from a known dictionary (hsae.sae.synthetic_dictionary): 32 dimensions,
32 independent features and 16 parents with 4 children each (112 features, ~3.5 per
dimension), Zipf-like frequencies, 4 active features per row on average. Every
architecture gets the same rows, the same width (320 latents; H-SAE: 64 parents × 5) and
the same number of steps, at an L0 near the true one; penalty coefficients (relu, gated,
jumprelu) were picked from a small sweep to land near L0 = 4. For each true feature the
score is its largest cosine to a decoder row, averaged over independent, parent and child
features, then mean ± standard deviation over seeds.

Usage: python bench/sae_recovery.py [--seeds 3] [--steps 3000] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from hsae.sae import make_sae
from hsae.sae.synthetic_dictionary import fit_sae, make_synthetic_dictionary, recovery_scores

D_MODEL, N_LATENTS, TRUE_L0 = 32, 320, 4
DICTIONARY = dict(d_model=D_MODEL, n_independent=32, n_parents=16, n_children=4, target_l0=TRUE_L0)
# JumpReLU's bandwidth and initial threshold are in pre-activation units; rows here have
# norm ~2, so the paper's 0.001 (for unit mean squared norm at d in the thousands) is too
# narrow a window to move the thresholds in 3000 steps.
JUMP = dict(bandwidth=0.05, init_threshold=0.1)
CONFIGS: dict[str, dict] = {
    "random (untrained topk)": dict(arch="topk", k=TRUE_L0),
    "topk": dict(arch="topk", k=TRUE_L0),
    "batchtopk": dict(arch="batchtopk", k=TRUE_L0),
    "relu": dict(arch="relu", l1_coeff=5.0),
    "jumprelu": dict(arch="jumprelu", sparsity_coeff=0.02, **JUMP),
    "gated": dict(arch="gated", l1_coeff=3.0),
    "matryoshka": dict(arch="matryoshka", k=TRUE_L0),
    "hierarchical": dict(arch="hierarchical", k=3, n_children=4),
    "hierarchical +parent_recon": dict(
        arch="hierarchical", k=3, n_children=4, parent_recon_coeff=0.3
    ),
}


def run_one(name: str, seed: int, n_steps: int) -> dict[str, float]:
    torch.set_num_threads(1)  # tiny matmuls: threads only wait for each other
    dictionary = make_synthetic_dictionary(**DICTIONARY, seed=0)
    torch.manual_seed(seed)
    sae = make_sae(d_model=D_MODEL, n_latents=N_LATENTS, **CONFIGS[name])
    start = time.perf_counter()
    if not name.startswith("random"):
        fit_sae(sae, dictionary, n_steps=n_steps, seed=seed)
    seconds = time.perf_counter() - start
    x, _ = dictionary.sample(8192, torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        out = sae.eval()(x)
    return {
        **recovery_scores(sae.decoder_rows(), dictionary),
        "l0": float((out.codes != 0).sum(-1).float().mean()),
        "fvu": float(out.recon_loss),
        "seconds": seconds,
    }


def summarise(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    jobs = [(name, seed) for name in CONFIGS for seed in range(args.seeds)]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {job: pool.submit(run_one, *job, args.steps) for job in jobs}
        results = {job: future.result() for job, future in futures.items()}

    columns = ("independent", "parent", "child", "l0", "fvu")
    print(f"| architecture | {' | '.join(columns)} | s/run |")
    print(f"|---|{'---|' * len(columns)}---|")
    for name in CONFIGS:
        runs = [results[(name, seed)] for seed in range(args.seeds)]
        cells = [summarise([r[c] for r in runs]) for c in columns]
        seconds = statistics.mean(r["seconds"] for r in runs)
        print(f"| {name} | {' | '.join(cells)} | {seconds:.0f} |")
    print(
        f"\n{args.seeds} seeds × {args.steps} steps of 256 rows; dictionary {DICTIONARY}; "
        f"{N_LATENTS} latents. machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, python {platform.python_version()}"
    )


if __name__ == "__main__":
    main()

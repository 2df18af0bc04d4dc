"""Grid of stand-in recipes: held-out accuracy and CPCC per layer for flat vs hier over seeds
(any device), and CPU seconds per training step (``--cpu-timing``, 2 threads). Used to pick
the default recipe (docs/stand_ins.md)."""

from __future__ import annotations

import argparse
import json
import time

import torch

from hsae.backbones.stand_in.models import make_stand_in
from hsae.backbones.stand_in.train import Recipe, _images, train_stand_in


def cpu_step_seconds(recipe: Recipe, n_steps: int = 15) -> float:
    import torch.nn.functional as F

    model = make_stand_in("vit", recipe.image_size, [3, 9, 27], dict(recipe.arch_kwargs))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(recipe.batch_size, 3, recipe.image_size, recipe.image_size)
    y = torch.randint(0, 27, (recipe.batch_size,))
    for i in range(n_steps + 3):
        if i == 3:
            start = time.perf_counter()
        _, logits = model(x)
        loss = F.cross_entropy(logits[-1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / n_steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("grid", help="JSON list of recipe overrides")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--objectives", default="flat,hier")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cpu-timing", action="store_true")
    args = parser.parse_args()
    from hsae.data import synthetic_tree

    for overrides in json.loads(args.grid):
        overrides = dict(overrides)
        data = overrides.pop("data", {})  # research knobs: module constants of synthetic_tree
        objectives = overrides.pop("objectives", args.objectives)
        for key, value in data.items():
            setattr(synthetic_tree, key, tuple(value) if isinstance(value, list) else value)
        _images.cache_clear()
        recipe = Recipe.from_dict(overrides)
        if args.cpu_timing:
            torch.set_num_threads(2)
            sec = cpu_step_seconds(recipe)
            print(json.dumps({"recipe": overrides, "cpu_s_per_step": round(sec, 4),
                              "cpu_s_total": round(sec * recipe.steps, 1)}), flush=True)  # fmt: skip
            continue
        _images(recipe.n_train, recipe.image_size, recipe.data_seed, "train")
        for objective in objectives.split(","):
            for seed in map(int, args.seeds.split(",")):
                _, metrics = train_stand_in("vit", objective, seed, recipe, device=args.device)
                print(json.dumps({"recipe": overrides, "data": data, "objective": objective, "seed": seed,
                                  **{k: round(v, 3) for k, v in metrics.items()}}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""Start-up: ``import pg_lightning`` and the first collected rollout, vs importing torch + gymnasium.

    python benchmarks/startup.py [--repeats 5]

Each measurement is a fresh subprocess; the commands alternate and medians are compared. Goal:
``import pg_lightning`` within 1.3x of ``import torch, gymnasium`` (the analysis API loads no Lightning).
Also checks that heavy optional modules (lightning, hydra, wandb, mujoco, matplotlib) are not imported by then.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPORT_REFERENCE = "import torch, gymnasium"
IMPORT_OURS = "import pg_lightning"
REFERENCE = "import torch, gymnasium; gymnasium.make_vec('CartPole-v1', num_envs=16).reset(seed=0)"
FIRST_ROLLOUT = (
    "import sys, pg_lightning as pg;"
    "pg.collect(pg.mlp_policy(*pg.VectorEnvFactory('CartPole-v1').spaces()), 'CartPole-v1', num_steps=1024, seed=0);"
    "print(','.join(m for m in ('lightning', 'hydra', 'wandb', 'mujoco', 'matplotlib') if m in sys.modules))"
)


def timed(code: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - start, out.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "startup.json")
    args = parser.parse_args()
    import_reference, import_ours, reference, ours, loaded = [], [], [], [], ""
    for _ in range(args.repeats):
        import_reference.append(timed(IMPORT_REFERENCE)[0])
        import_ours.append(timed(IMPORT_OURS)[0])
        reference.append(timed(REFERENCE)[0])
        seconds, loaded = timed(FIRST_ROLLOUT)
        ours.append(seconds)
    import_ratio = statistics.median(import_ours) / statistics.median(import_reference)
    result = {
        "import_torch_gymnasium_s": round(statistics.median(import_reference), 2),
        "import_pg_lightning_s": round(statistics.median(import_ours), 2),
        "import_ratio": round(import_ratio, 3),
        "torch_gymnasium_s": round(statistics.median(reference), 2),
        "pg_lightning_first_rollout_s": round(statistics.median(ours), 2),
        "ratio": round(statistics.median(ours) / statistics.median(reference), 2),
        "heavy_modules_loaded": loaded.split(",") if loaded else [],
    }
    print(f"import torch, gymnasium:                         {result['import_torch_gymnasium_s']:.2f} s")
    print(f"import pg_lightning:                              {result['import_pg_lightning_s']:.2f} s "
          f"({result['import_ratio']:.2f}x, goal <= 1.3x)")
    print(f"import torch + gymnasium, reset CartPole:        {result['torch_gymnasium_s']:.2f} s")
    print(f"import pg_lightning, first 1024-step rollout:     {result['pg_lightning_first_rollout_s']:.2f} s "
          f"({result['ratio']:.2f}x)")
    print(f"optional heavy modules loaded by then: {result['heavy_modules_loaded'] or 'none'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

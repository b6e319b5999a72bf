"""Engine overhead on the embedded model: no plan vs ``identity`` vs every policy at its no-op setting.

Target (issue 14): every policy present at its no-op setting costs <= 3 % over no plan. Runs
:func:`fastvar.eval.run.engine_overhead` (interleaved rounds after a warm-up, medians) and writes the
JSON with the command that produced it::

    OMP_NUM_THREADS=1 python benchmarks/engine_overhead.py --repeats 15 --json benchmarks/engine_overhead.json

The default clock is the process's CPU time (``--clock cpu``): with one thread it is the work this run
does, whatever else the machine runs; wall time (also recorded) is the number to quote on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch

    from fastvar.eval.run import engine_overhead
    from fastvar.models.registry import get_spec
    from fastvar.pipelines import load_pipeline
    from fastvar.pipelines.common import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=10, help="classes per generation (0..batch-1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                   help="cpu: this process's CPU seconds (robust on a shared machine); wall: the pipeline's time")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    spec = get_spec("embedded")
    pipe = load_pipeline(spec, device="cpu")
    classes = [i % spec.config["num_classes"] for i in range(args.batch)]
    out = engine_overhead(pipe, classes, repeats=args.repeats, warmup=args.warmup, seed=args.seed, clock=args.clock,
                          log=lambda m: print(m, file=sys.stderr))
    for r in out["rows"]:
        print(f"{r['plan']:<10} median {r['seconds_median']:.4f}s ({args.clock})  overhead {100 * r['overhead']:+.2f} %  "
              f"paired {100 * r['paired_overhead']:+.2f} %  wall {100 * r['wall_overhead']:+.2f} %  "
              f"bit-identical {r['bit_identical']}")
    out.update(model="embedded", device="cpu", threads=torch.get_num_threads(), torch=torch.__version__,
               python=platform.python_version(), load_average=list(os.getloadavg()), target=0.03,
               command="OMP_NUM_THREADS=1 python benchmarks/engine_overhead.py "
                       + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.json:
        atomic_write_text(json.dumps(out, indent=2), Path(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())

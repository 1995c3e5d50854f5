"""No torch optimizer at all: noisy SGD on a quadratic, `x -= eta * lr() * grad`, with
the LR a knob steered by name (`trainctl set ID lr_scale 0.1`).

Run:  TRAINCTL_SERVER=localhost:50051 python examples/attach/noisy_sgd.py --steps 2000
"""
from __future__ import annotations

import argparse
import random
import time

import trainctl


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="noisy-sgd")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eta", type=float, default=0.05)
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replay", type=int, default=0, help="re-apply experiment ID's commands at the same steps")
    args = p.parse_args()

    rng = random.Random(args.seed)
    x = [5.0, -3.0]  # minimise f(x) = x0^2 + 10 x1^2 from here, with noisy gradients
    with trainctl.init(name=args.name, config=args, tags=["example"], replay=args.replay) as run:
        lr = run.knob("lr_scale", 1.0, low=0.0, high=10.0)
        for step in range(args.steps):
            run.step()
            grad = [2 * x[0] + rng.gauss(0, args.noise), 20 * x[1] + rng.gauss(0, args.noise)]
            x = [xi - args.eta * lr.value * gi for xi, gi in zip(x, grad)]
            run.log(loss=x[0] ** 2 + 10 * x[1] ** 2, lr_scale=lr.value)
            if args.step_delay:
                time.sleep(args.step_delay)
    print(f"done: experiment {run.id}, {args.steps} steps, loss {x[0] ** 2 + 10 * x[1] ** 2:.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Reference posterior moments for ``benchmarks/posteriors.py`` from long NUTS runs.

Run once (minutes per target on one core); the results are stored as small JSON files
in ``benchmarks/posteriors/`` (``<target>.json``: the flattened unconstrained latent's
``mean`` and ``sd``, and the run's diagnostics: chains, draws, the largest split R-hat
and the smallest bulk ESS over coordinates).

Centred models are sampled in their non-centred form, which NUTS handles without
divergences, and the draws are mapped to the centred latents (``theta = mu + tau eta``,
``a = mu_a + sigma_a eta``): the same posterior, in the coordinates the guides see.
Everything runs in float64.

    python benchmarks/posteriors_reference.py                    # every NUTS target
    python benchmarks/posteriors_reference.py --targets radon --chains 4 --samples 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

sys.path.insert(0, str(Path(__file__).resolve().parent))
import posteriors  # noqa: E402  (the suite's models, next to this script)


def _centred_schools(s: dict) -> dict:
    theta = s["mu"][..., None] + s["tau"][..., None] * s["eta"]
    return {"mu": s["mu"], "tau": s["tau"], "theta": theta}


def _centred_radon(s: dict) -> dict:
    a = s["mu_a"][..., None] + s["sigma_a"][..., None] * s["eta"]
    names = ("mu_a", "sigma_a", "beta", "sigma_y")
    return {**{name: s[name] for name in names}, "a": a}


#: source -> (the model NUTS samples, {suite target: (its model, map of the draws)}).
SOURCES = {
    "schools": (
        lambda: posteriors.schools_noncentred,
        {
            "schools_nc": (lambda: posteriors.schools_noncentred, lambda s: s),
            "schools_c": (lambda: posteriors.schools_centred, _centred_schools),
        },
    ),
    "logistic": (
        posteriors.make_logistic,
        {"logistic": (posteriors.make_logistic, lambda s: s)},
    ),
    "radon": (
        lambda: posteriors.make_radon(centred=False),
        {"radon": (lambda: posteriors.make_radon(centred=True), _centred_radon)},
    ),
}


def run_chains(model, chains: int, samples: int, warmup: int, seed: int) -> dict:
    """``chains`` NUTS chains one after another (one core); draws ``(chains, samples, ...)``."""
    per_chain = []
    for chain in range(chains):
        pyro.set_rng_seed(seed + chain)
        kernel = NUTS(model, target_accept_prob=0.9, jit_compile=True, ignore_jit_warnings=True)
        mcmc = MCMC(kernel, num_samples=samples, warmup_steps=warmup, disable_progbar=True)
        mcmc.run()
        per_chain.append(mcmc.get_samples())
    return {name: torch.stack([c[name] for c in per_chain]) for name in per_chain[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(SOURCES))
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=str(posteriors.REFERENCE_DIR))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    for source in args.targets.split(","):
        make_model, targets = SOURCES[source]
        start = time.perf_counter()
        draws = run_chains(make_model(), args.chains, args.samples, args.warmup, args.seed)
        seconds = time.perf_counter() - start
        for name, (make_target, mapping) in targets.items():
            model = make_target()
            flat_draws = mapping({k: v.reshape(-1, *v.shape[2:]) for k, v in draws.items()})
            flat = posteriors.unconstrained_flat(model, flat_draws)
            chained = flat.reshape(args.chains, args.samples, -1)
            ess = effective_sample_size(chained, chain_dim=0, sample_dim=1)
            rhat = split_gelman_rubin(chained, chain_dim=0, sample_dim=1)
            record = {
                "target": name,
                "mean": flat.mean(0).tolist(),
                "sd": flat.std(0).tolist(),
                "log_z": None,
                "nuts": {
                    "chains": args.chains,
                    "samples": args.samples,
                    "warmup": args.warmup,
                    "seed": args.seed,
                    "max_rhat": float(rhat.max()),
                    "min_ess": float(ess.min()),
                    "seconds": seconds,
                },
            }
            (output / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
            print(
                f"{name}: D={flat.shape[-1]} max R-hat {float(rhat.max()):.3f} "
                f"min ESS {float(ess.min()):.0f} ({seconds:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()

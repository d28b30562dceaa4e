"""Scenario presets: the published multi-LoRA workloads, each sized for a CPU demo run and a GPU run.

A preset only sets defaults: any flag given on the command line wins. The numbers are the shape of
the papers' synthetic workloads, not a copy of their testbeds:

- S-LoRA (Sheng et al., 2023): Gamma-process arrivals at a total rate with the paper's default CV of 1,
  which is a Poisson process (raise `--cv` for burstier traffic), adapter popularity following a power
  law (α = 1), input and output lengths uniform over ranges (8 to 512 tokens at GPU size), many adapters.
- Punica (Chen et al., 2023): a closed loop of concurrent requests under four popularity patterns:
  Distinct (every request its own adapter), Uniform (all adapters equally popular), Skewed
  (Zipf, α = 1.5) and Identical (one adapter for everything).

The CPU sizes fit lorahive's demo model on two cores in well under a minute; the GPU sizes are for a
real 7-8B model on one data-centre GPU.
"""

from __future__ import annotations

from typing import Any

_SLORA = {"popularity": "zipf:1.0", "cv": 1.0}
_PUNICA_POPULARITY = {
    "distinct": "distinct",
    "uniform": "uniform",
    "skewed": "zipf:1.5",
    "identical": "identical",
}

PRESETS: dict[str, dict[str, Any]] = {
    "slora-cpu": _SLORA | {
        "adapters": 20, "rate": 4.0, "input_len": "8:64", "output_len": "8:32", "duration": 30.0,
        "warmup": 3.0, "rank": 8,
    },
    "slora-gpu": _SLORA | {
        "adapters": 200, "rate": 6.0, "input_len": "8:512", "output_len": "8:512", "duration": 300.0,
        "warmup": 30.0, "rank": 16,
    },
}
for _name, _popularity in _PUNICA_POPULARITY.items():
    PRESETS[f"punica-{_name}-cpu"] = {
        "popularity": _popularity, "concurrency": 8, "adapters": 1 if _name == "identical" else 32,
        "input_len": "16:64", "output_len": "16:64", "num_requests": 64, "warmup_requests": 8, "rank": 8,
    }
    PRESETS[f"punica-{_name}-gpu"] = {
        "popularity": _popularity, "concurrency": 32, "adapters": 1 if _name == "identical" else 128,
        "input_len": "8:512", "output_len": "8:512", "num_requests": 1000, "warmup_requests": 32, "rank": 16,
    }

DESCRIPTIONS = {
    "slora": "S-LoRA: Poisson arrivals (its Gamma process at CV 1; --cv 2 for bursts), power-law (zipf:1) "
             "popularity over many adapters, uniform lengths",
    "punica-distinct": "Punica Distinct: closed loop, every request its own adapter",
    "punica-uniform": "Punica Uniform: closed loop, adapters equally popular",
    "punica-skewed": "Punica Skewed: closed loop, Zipf(1.5) popularity",
    "punica-identical": "Punica Identical: closed loop, one adapter for every request",
}


def describe(name: str) -> str:
    family = name.rsplit("-", 1)[0]
    settings = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS[name].items())
    return f"{name:22} {DESCRIPTIONS[family]}\n{'':22} {settings}"

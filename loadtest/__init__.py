"""lorahive's load-test harness: the S-LoRA / Punica traffic shapes against any OpenAI-compatible server.

It talks HTTP only and imports nothing from `server/`, `kernels/` or `adapters_store/`, so the same run
can point at lorahive, vLLM or anything else that speaks the OpenAI streaming API and compare them.

Modules, one job each: `arrivals` (when requests are sent), `workload` (what each request asks for),
`client` (one streamed request, timed), `runner` (drives a whole run), `progress` (the live bar),
`metrics` (summaries), `report` and `plots` (files), `synthetic_adapters` + `provision` (adapters over
REST), `presets` (published workloads), `flag_values` (the flags' value types and a sweep's knobs), `cli`
(the command line), `commands` (what each command does).
"""

__version__ = "0.1.0"

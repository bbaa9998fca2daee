"""Scaling and cost planning: exact parameter counts, FLOPs per token, memory per GPU,
Chinchilla scaling laws and their fit to your own runs, peak throughput of named GPUs.

Pure arithmetic on configs (no torch import at module level), so `stoker count` and
`stoker plan` answer instantly on any machine. The formulas, their sources and the
conventions are written out in docs/scaling.md.

- `flops`: `count_params`, `flops_per_token`, `forward_flops`, `estimate_memory`.
- `hardware`: `peak_flops`, `lookup_device`, the dense peak table of docs/scaling.md §4.
- `laws`: `Chinchilla` (Hoffmann / Besiroglu constants), compute-optimal N/D, `fit_law`.
- `report`: the `count` and `plan` subcommands.
"""

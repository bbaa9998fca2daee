"""System monitor, advice and plots.

- `system`: a background sampler (CPU, RAM, RSS, NVIDIA GPUs via NVML, torch.cuda memory)
  writing `out_dir/system.jsonl` and a one-line progress-bar summary;
- `advice`: pure rules from measured signals to concrete config changes;
- `commands`: `stoker monitor` (live system line + environment checks);
- `plot`: `stoker plot RUN ...` (headless matplotlib figures of metrics and system rows).

psutil, nvidia-ml-py and matplotlib are optional (`pip install 'stoker[monitor]'`) and
imported lazily; without them the monitor leaves the corresponding readings out.
"""

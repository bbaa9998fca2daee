"""`make bench`: the model and data-loader benchmark, now the `stoker bench` command.

    .venv/bin/python benchmarks/bench_model.py [OPTIONS]   # = stoker bench [OPTIONS]

What is measured, against which peers, and every option: `stoker bench --help` and the
docstring of src/stoker/bench.py.
"""

from stoker.bench import main

if __name__ == "__main__":
    main()

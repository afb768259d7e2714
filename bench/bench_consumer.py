"""Consumer benchmark (docs/benchmarks.md, Consumer): ``python bench/bench_consumer.py --store URL#cohort [--json]``.

Same as ``xwin bench consumer``; without ``--store`` it renders the bundled CT into a temporary bench store.
"""

from xwin.flows.cli.bench import consumer_main

if __name__ == "__main__":
    consumer_main()

"""routerd benchmarks against direct llama-server and llama-server's router mode.

    python -m bench                  # full run (about 7-12 min on 2 cores); writes
                                     # docs/performance.md and docs/performance.png
    python -m bench --quick          # smoke run with tiny counts; prints, writes nothing
    python -m bench --only warm,cold --warm-rounds 100
    python -m bench --ab /tmp/copy   # also run routerd from a copied, changed source tree
                                     # as peer routerd-B (A/B a change in the same run)
    python -m bench --keep           # keep the work dir: logs of every peer, py-spy stacks

Modules: procs (the peers as processes), client (timed chat/stream), real (scenarios on the
real model), capacity (fake-worker routing capacity and footprint), loadgen (lean HTTP load
generator), quiet (wait for a quiet machine), profiling (py-spy), results/report/document
(statistics, table, chart, docs/performance.md; hand-written notes in bench/notes.md).
"""

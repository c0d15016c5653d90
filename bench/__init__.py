"""routerd benchmarks against direct llama-server and llama-server's router mode.

    python -m bench            # full run (~10 min on 2 cores), writes docs/performance.{md,png}
    python -m bench --quick    # smoke run, prints the table, writes nothing unless --write
"""

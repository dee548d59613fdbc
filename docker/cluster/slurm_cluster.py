"""Start a dask-jobqueue SLURMCluster for `atlas ingest --scheduler ADDRESS --gpu` and keep it alive.

Usage (on a login node, with `pip install dask-jobqueue` and `jobqueue-slurm.yaml` in ~/.config/dask/):
    python docker/cluster/slurm_cluster.py --jobs 8 &
    atlas ingest --corpus prompts.jsonl --transcoders clt/ --scheduler "$(cat atlas-scheduler.txt)" --gpu
The scheduler runs in this process; stop it (Ctrl-C) when the ingest has finished. This script only starts the
cluster: it never touches the stores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    from dask_jobqueue import SLURMCluster

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=4, help="SLURM jobs (= GPU workers) to request")
    parser.add_argument("--address-file", type=Path, default=Path("atlas-scheduler.txt"))
    args = parser.parse_args()
    cluster = SLURMCluster(scheduler_options={"port": 8786, "dashboard_address": ":8787"})
    cluster.scale(jobs=args.jobs)
    args.address_file.write_text(cluster.scheduler_address + "\n")
    print(f"scheduler {cluster.scheduler_address}; dashboard {cluster.dashboard_link}")
    print(cluster.job_script())
    try:
        while True:
            time.sleep(60)
    finally:
        cluster.close()


if __name__ == "__main__":
    main()

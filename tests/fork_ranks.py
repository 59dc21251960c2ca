"""
Runs of train.py on 2 gloo ranks, forked from one process that imported everything once:

    python tests/fork_ranks.py '[["--stage", "mae", ...], [...]]'     # the runs, in turn

Each run is two forked processes with the variables torchrun sets (RANK, WORLD_SIZE, ...)
calling train.main(argv): the same code path as `torchrun --nproc_per_node=2 train.py`, without
paying torch's, dynamo's (AdamW's first use), FSDP's and matplotlib's imports (~7 s) per run.
Exit 0 when every rank of every run exits 0; otherwise the failed run's output and exit 1.
"""
import json
import os
import socket
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import matplotlib.pyplot  # noqa: E402,F401 (imported before the forks: once)
import torch  # noqa: E402
import torch.distributed.fsdp  # noqa: E402,F401

import train  # noqa: E402

torch.optim.AdamW([torch.zeros(1, requires_grad=True)])   # its first use imports dynamo


def rank(argv, r, port, log):
    """Rank r of a 2-rank run, in a forked child: its output to `log`, then exit."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1), os.dup2(fd, 2)
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    code = 1
    try:
        train.main(argv)
        code = 0
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    logs = tempfile.mkdtemp()
    for i, argv in enumerate(json.loads(sys.argv[1])):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        pids = []
        for r in range(2):
            pid = os.fork()
            if pid == 0:
                rank(argv, r, port, os.path.join(logs, f"{i}.{r}"))
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        if codes != [0, 0]:
            for r in range(2):
                print(f"run {i} rank {r} (exit {codes[r]}):\n" + open(os.path.join(
                    logs, f"{i}.{r}")).read()[-3000:], file=sys.stderr)
            sys.exit(1)

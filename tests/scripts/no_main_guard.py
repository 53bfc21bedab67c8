# A training script with no `if __name__ == "__main__":` guard that never calls
# close(). The process executor must not re-run it in its worker (as
# multiprocessing's spawn would), and the interpreter must still exit promptly,
# finish the save in flight and leave no worker behind.
#
# argv: <committed id> <pending-at-exit id> <dropped-checkpointer id>
# prints: "script body runs", then the two worker pids, one per line.
import gc
import sys

import torch

import async_ckpt

print("script body runs", flush=True)
committed, pending, dropped = sys.argv[1:4]

ckpt = async_ckpt.AsyncCheckpointer(executor="process")
first = ckpt.save(
    {"w": torch.arange(1000, dtype=torch.float32), "step": 7}, checkpoint_id=committed
)
# A checkpointer nobody closes or keeps; both workers start side by side.
other = async_ckpt.AsyncCheckpointer(executor="process")
other.save({"w": torch.ones(100)}, checkpoint_id=dropped).result(timeout=120)
print(other.worker_pid, flush=True)
del other
gc.collect()

first.result(timeout=120)
ckpt.save({"w": torch.arange(1 << 20, dtype=torch.float32)}, checkpoint_id=pending)
print(ckpt.worker_pid, flush=True)

"""Run under torchrun with picstream-train's arguments (``--config FILE key=value ...``): train, close
the trainer, and print whether the process group is gone (``Trainer.close``'s promise) — ``group
freed: True`` on every rank."""
import gc
import sys
import weakref

import torch.distributed as dist

from picstream.config import load_config
from picstream.train import Trainer

trainer = Trainer(load_config(sys.argv[2], sys.argv[3:]), resume="none", show_progress=False)
group = weakref.ref(dist.distributed_c10d._get_default_group())
trainer.run()
trainer.close()
gc.collect()
print(f"rank {trainer.world.rank} group freed: {group() is None}", flush=True)

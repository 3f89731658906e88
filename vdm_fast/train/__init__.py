"""Training: `vdm-fast train`, `python -m vdm_fast.train`, `torchrun -m vdm_fast.train` (DDP), or from Python:

    from vdm_fast.train import TrainConfig, train
    result = train(TrainConfig(preset="tiny", data="bouncing", steps=1000, out="runs/demo"))

The parts: config (TrainConfig, its checks and the resume policy), trainer (Trainer, train), step (one optimizer
step: accumulation, precision, the non-finite guard), ema (EMA, for any training loop), resume (the run folder and
checkpoints), distributed (process group, devices, timeouts), interrupts (SIGINT/SIGTERM), logs (log, loss curve,
progress), samples (preview videos), cli (the options). Imports point one way: cli -> trainer -> the others.
"""

from vdm_fast.train.cli import add_arguments, config_from_args, given_options, main, run_from_args
from vdm_fast.train.config import TrainConfig, lr_at, merge_resumed
from vdm_fast.train.distributed import DistributedTimeout
from vdm_fast.train.ema import EMA
from vdm_fast.train.logs import plot_losses
from vdm_fast.train.monitor import TrainingDiverged
from vdm_fast.train.trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "DistributedTimeout", "EMA", "train", "add_arguments",
           "config_from_args", "given_options", "main", "run_from_args", "lr_at", "merge_resumed", "plot_losses"]

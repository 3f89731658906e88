"""Training: `vdm-fast train`, `python -m vdm_fast.train`, `torchrun -m vdm_fast.train` (DDP or --fsdp), or from Python:

    from vdm_fast.train import TrainConfig, train
    result = train(TrainConfig(preset="tiny", data="bouncing", steps=1000, out="runs/demo"))

Which options for which model (memory per GPU, P parameters, fp32 master weights):

- weights 4P bytes, gradients 4P, AdamW's two moments 8P, the EMA copy 4P: 20P before activations, e.g. 23 GB for
  the 1.17 B `ucf101`/`kinetics` presets, 2.7 GB for the 137 M `bair` one, 16 MB for `tiny`;
- activations grow with the batch and the clip (16x64x64, 9x128x128): `--grad-accum K` keeps the update of the whole
  batch with 1/K of the activations per micro-step; `--gradient-checkpointing` keeps only each block's input and
  recomputes the rest in backward (same gradients bitwise, one more forward per block); use both for the 1 B presets;
- `--precision auto` is bf16 autocast on GPUs (fp32 weights and optimizer); `--precision fp16` (a GradScaler skips
  the steps whose gradients overflow and backs its scale off) for GPUs without bf16; `--compile` compiles the model
  with Inductor (the first steps are slow); `--cuda-graph` captures the whole step in CUDA graphs (small models,
  whose steps are launch-bound; one GPU, static shapes); `torchrun --nproc_per_node=N` splits --batch-size over N
  GPUs (DDP);
- `--fsdp` (FSDP2) shards those 20P bytes over the N processes (20P / N each, plus one block's gathered weights):
  use it when 20P does not fit one GPU beside the activations, e.g. `ucf101` on 8 x 24 GB (2.9 GB each instead of
  23 GB); where 20P fits, DDP is simpler (one all-reduce a step; FSDP all-gathers each block's weights in forward
  and again in backward, then reduce-scatters). Same checkpoints, exact --resume (train.fsdp).
- `--frame-parallel [--frame-parallel-size K]` splits each clip's frames over K processes, for clips whose
  activations do not fit one GPU, with world / K data-parallel replicas (train.frame_parallel).

The parts: config (TrainConfig, its checks and the resume policy), trainer (Trainer, train), step (one optimizer
step: accumulation, precision, the non-finite guard), graph (that step captured in CUDA graphs), ema (EMA, for any
training loop), fsdp (FSDP2 sharding and its full state dicts), frame_parallel (frames of each clip over a group of
processes), resume (the run folder and checkpoints), distributed (process group, devices, timeouts), interrupts
(SIGINT/SIGTERM), logs (log, loss curve, progress), samples (preview videos), cli (the options).
Imports point one way: cli -> trainer -> the others.
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
